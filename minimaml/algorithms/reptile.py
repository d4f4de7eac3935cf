"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms"): no query loss
and no derivative of the inner loop. Each task trains from theta for k steps of SGD or Adam on its
examples, giving phi_i; then

    theta <- theta + epsilon mean_i (phi_i - theta),

with epsilon annealed linearly (the authors' ``--meta-step 1 --meta-step-final 0``). As an optimizer
step: ``meta_gradient`` returns sum_i (theta - phi_i) (the experiments divide by the number of tasks),
and the outer optimizer is SGD with step size epsilon(t) (``schedules.linear``).

In training a task's examples are its support and query sets pooled (Reptile has no query set), all k
steps on the whole set, all tasks at once (the task axis; per-task Adam is elementwise, so batched).
Evaluation fine-tunes on the support set with the same inner optimizer. (The authors' code draws
mini-batches from the task's examples and keeps one Adam state across tasks; here each task starts
with a fresh Adam state.)
"""

from __future__ import annotations

from .. import autodiff as ad
from .. import backend, maml, optim
from ..tasks.batch import Examples
from . import schedules
from .maml import MAML, check_inner_steps

INNER_OPTIMIZERS = ("sgd", "adam")


def inner_optimizer(name: str, inner_lr: float):
    """SGD, or Adam with beta1 = 0 as in the authors' code."""
    if name not in INNER_OPTIMIZERS:
        raise ValueError(f"reptile: unknown inner optimizer {name!r}: expected one of {INNER_OPTIMIZERS}")
    return optim.SGD(inner_lr) if name == "sgd" else optim.Adam(inner_lr, b1=0.0)


def train_steps(task_loss, params: dict, data, inner_lr: float, steps: int, optimizer: str = "sgd"):
    """phi_i^0 = theta, ..., phi_i^k: each task's ``steps`` steps of the inner optimizer on its own
    ``data``, all tasks at once; yields dicts of constant Tensors ``(T, ...)``."""
    opt = inner_optimizer(optimizer, inner_lr)
    phi = {n: t.data for n, t in maml.per_task(params, data.n_tasks).items()}
    state = opt.init(phi)
    yield {n: ad.Tensor(p) for n, p in phi.items()}
    for _ in range(steps):
        _, grads = ad.value_and_grad(lambda p: ad.sum(task_loss(p, data)), phi)
        phi, state = opt.update(phi, grads, state)
        yield {n: ad.Tensor(p) for n, p in phi.items()}


def pooled(tasks) -> Examples:
    """A task's training examples: its support and query sets together."""
    xp = backend.array_namespace(tasks.support.x)
    return Examples(xp.concatenate([tasks.support.x, tasks.query.x], axis=1),
                    xp.concatenate([tasks.support.y, tasks.query.y], axis=1))


def reptile_direction(task_loss, params: dict, data, inner_lr: float, inner_steps: int, optimizer: str = "sgd"):
    """(sum_i L_i(phi_i) after training, sum_i (theta - phi_i)): minus the Reptile direction, times T."""
    *_, phi = train_steps(task_loss, params, data, inner_lr, inner_steps, optimizer)
    with ad.no_grad():
        loss = float(ad.sum(task_loss(phi, data)).data)
    return loss, {n: params[n] * data.n_tasks - phi[n].data.sum(axis=0) for n in params}


class Reptile(MAML):
    """Reptile; defaults: the authors' Omniglot 5-way setting (Adam 1e-3, 5 inner steps, epsilon 1 -> 0)."""

    name = "reptile"

    def __init__(self, inner_lr: float = 1e-3, inner_steps: int = 5, *, optimizer: str = "adam",
                 epsilon: float = 1.0, epsilon_final: float = 0.0):
        super().__init__(inner_lr, check_inner_steps(self.name, inner_steps))
        inner_optimizer(optimizer, inner_lr)  # checks the name
        if not epsilon > 0 or epsilon_final < 0:
            raise ValueError(f"reptile: need epsilon > 0 and epsilon_final >= 0, got {epsilon}, {epsilon_final}")
        self.inner_optimizer, self.epsilon, self.epsilon_final = optimizer, float(epsilon), float(epsilon_final)

    def meta_gradient(self, task_loss, meta_params, tasks, iteration):
        loss, direction = reptile_direction(task_loss, meta_params, pooled(tasks), self.inner_lr,
                                            self.inner_steps, self.inner_optimizer)
        return loss, direction, {}

    def optimizer(self, meta_lr, n_iterations, clip_value=None):
        """SGD with step size epsilon(t), linear from ``epsilon`` to ``epsilon_final`` (``meta_lr`` unused)."""
        return schedules.Scheduled(optim.SGD, schedules.linear(self.epsilon, self.epsilon_final, max(n_iterations, 1)))

    def adaptation_steps(self, task_loss, meta_params, support, steps):
        return train_steps(task_loss, meta_params, support, self.inner_lr, steps, self.inner_optimizer)
