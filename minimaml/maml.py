"""MAML: inner adaptation and the meta-gradient, for a whole meta-batch of tasks at once.

Notation (Finn et al. 2017, Algorithm 1 and Sec. 2.2): task i has a support set S_i and a query set
Q_i; ``alpha`` is ``inner_lr``; K is ``inner_steps``.

    inner loop    theta_i^0 = theta,   theta_i^{k+1} = theta_i^k - alpha * grad L_{S_i}(theta_i^k)
    meta-objective                      L(theta) = sum_i L_{Q_i}(theta_i^K)

The tasks ride on a leading task axis: the adapted parameters of all T tasks are one dict of arrays
``(T, ...)``, and ``apply`` runs them on the task-axis data ``(T, N, ...)`` in one batched call. Because
sum_i L_{S_i}(theta_i) has gradient grad L_{S_i}(theta_i) with respect to theta_i, one ``grad`` call
gives every task's inner gradient.

The meta-gradient, by the chain rule through the inner loop (one step: J = I - alpha H_S(theta)):

    grad L(theta) = sum_i (I - alpha H_{S_i}(theta_i^0)) ... (I - alpha H_{S_i}(theta_i^{K-1}))
                          grad L_{Q_i}(theta_i^K)

Three ways to compute it (``mode``):

- ``"second_order"``: record the inner loop, inner gradients included (``create_graph=True``), and
  differentiate the query loss through all of it. Memory grows with K (the whole unrolled graph).
- ``"hvp"``: the same exact gradient, right to left, one step's graph at a time:
  v_K = grad L_Q(theta^K);  v_k = v_{k+1} - alpha H_S(theta^k) v_{k+1};  grad L = sum_i v_0.
  Each H v is an exact Hessian-vector product (reverse over reverse). Memory: one step's graph.
- ``"first_order"``: drop the Hessian terms (the inner gradients are constants): sum_i grad L_Q(theta_i^K).

Parameters not named in ``inner_param_names`` are meta-learned but not adapted (e.g. a batch-norm
shift); the query loss still depends on them directly and through the inner gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import autodiff as ad
from . import backend

MODES = ("second_order", "hvp", "first_order")


@dataclass
class TaskBatch:
    """A meta-batch of T tasks: ``support_x (T, N_s, ...)``, ``support_y (T, N_s, ...)``,
    ``query_x (T, N_q, ...)``, ``query_y (T, N_q, ...)``."""

    support_x: object
    support_y: object
    query_x: object
    query_y: object

    @property
    def n_tasks(self) -> int:
        return self.support_x.shape[0]


def _task_loss(apply, loss_fn, params, x, y) -> ad.Tensor:
    """sum_i L_i(params_i): the per-task mean losses, summed over the task axis."""
    return ad.sum(loss_fn(apply(params, x), y))


def _per_task(params: dict, names, n_tasks: int) -> dict:
    """theta_i^0 = theta for every task: the adapted parameters get a leading task axis."""
    return {name: ad.broadcast_to(p, (n_tasks,) + p.shape) if name in names else p
            for name, p in params.items()}


def inner_step(apply, loss_fn, params: dict, x, y, inner_lr, names, create_graph: bool) -> dict:
    """One step of every task's gradient descent on its own loss:
    theta_i <- theta_i - alpha * grad L_i(theta_i) for the parameters in ``names``.

    ``inner_lr`` is a number, or a dict of per-parameter step sizes (Meta-SGD's learned alpha).
    """
    # A constant parameter (e.g. at evaluation) becomes a leaf, so its inner gradient can be taken.
    params = {n: ad.Tensor(p.data, requires_grad=True) if n in names and not p.requires_grad else p
              for n, p in params.items()}
    loss = _task_loss(apply, loss_fn, params, x, y)
    grads = ad.grad(loss, [params[n] for n in names], create_graph=create_graph)
    adapted = dict(params)
    for name, g in zip(names, grads):
        lr = inner_lr[name] if isinstance(inner_lr, dict) else inner_lr
        adapted[name] = params[name] - lr * g
    return adapted


def adaptation_steps(apply, loss_fn, params: dict, support_x, support_y, inner_lr, inner_steps: int,
                     inner_param_names=None):
    """Yield theta_i^0, theta_i^1, ..., theta_i^K for every task (dicts of Tensors; the adapted
    parameters carry a leading task axis ``(T, ...)``), for evaluating after each fine-tuning step.

    No meta-gradient is kept: each step's parameters are fresh leaves. ``inner_lr`` may be a callable
    ``step -> lr`` (e.g. the RL test protocol halves the step size after the first step).
    """
    names = list(params) if inner_param_names is None else list(inner_param_names)
    theta = {n: ad.Tensor(p.data if isinstance(p, ad.Tensor) else p, requires_grad=n in names)
             for n, p in params.items()}
    theta = _per_task(theta, names, support_x.shape[0])
    yield theta
    for step in range(inner_steps):
        lr = inner_lr(step) if callable(inner_lr) else inner_lr
        theta = inner_step(apply, loss_fn, theta, support_x, support_y, lr, names, create_graph=False)
        theta = {n: ad.Tensor(p.data, requires_grad=n in names) for n, p in theta.items()}
        yield theta


def adapt(apply, loss_fn, params: dict, support_x, support_y, inner_lr, inner_steps: int,
          inner_param_names=None) -> dict:
    """theta_i^K for every task: ``inner_steps`` steps of gradient descent on each support set, with
    no meta-gradient kept (for evaluation). ``params``: shared parameters (no task axis)."""
    for theta in adaptation_steps(apply, loss_fn, params, support_x, support_y, inner_lr, inner_steps,
                                  inner_param_names):
        pass
    return theta


def meta_gradient(apply, loss_fn, params: dict, tasks: TaskBatch, inner_lr, inner_steps: int,
                  mode: str = "second_order", inner_param_names=None):
    """The meta-objective L(theta) = sum_i L_{Q_i}(theta_i^K) and its gradient.

    ``apply(params, x)``: the model; ``loss_fn(prediction, target)``: per-task mean losses ``(T,)``.
    ``params``: dict of arrays (no task axis). ``mode``: ``"second_order"``, ``"hvp"`` or
    ``"first_order"`` (see the module docstring). Returns ``(meta_loss: float, grads: dict)`` with
    ``grads`` named and shaped like ``params``.
    """
    if mode not in MODES:
        raise ValueError(f"meta_gradient: unknown mode {mode!r}: expected one of {MODES}")
    if inner_steps < 0:
        raise ValueError(f"meta_gradient: inner_steps must be >= 0, got {inner_steps}")
    names = list(params) if inner_param_names is None else list(inner_param_names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise KeyError(f"meta_gradient: inner_param_names {unknown} are not parameters ({list(params)})")
    if mode == "hvp":
        return _meta_gradient_hvp(apply, loss_fn, params, tasks, inner_lr, inner_steps, names)

    theta = {n: ad.Tensor(p, requires_grad=True) for n, p in params.items()}
    adapted = _per_task(theta, names, tasks.n_tasks)
    if mode == "second_order":
        for _ in range(inner_steps):
            adapted = inner_step(apply, loss_fn, adapted, tasks.support_x, tasks.support_y, inner_lr,
                                 names, create_graph=True)
    else:  # first order: theta_i^K = theta + delta_i, the inner displacement delta_i held constant
        final = adapt(apply, loss_fn, params, tasks.support_x, tasks.support_y, inner_lr, inner_steps,
                      names)
        adapted = {n: adapted[n] + ad.Tensor(final[n].data - params[n]) if n in names else adapted[n]
                   for n in params}
    meta_loss = _task_loss(apply, loss_fn, adapted, tasks.query_x, tasks.query_y)
    grads = ad.grad(meta_loss, list(theta.values()))
    return float(meta_loss.data), {n: g.data for n, g in zip(theta, grads)}


def _meta_gradient_hvp(apply, loss_fn, params, tasks, inner_lr, inner_steps, names):
    """The exact meta-gradient by the Hessian-vector-product chain (module docstring), which holds
    one inner step's graph at a time instead of the whole unrolled loop.

    For the adapted parameters theta (per task): v_K = grad_theta L_Q(theta^K), then for k = K-1..0
    v_k = v_{k+1} - alpha * H_S(theta^k) v_{k+1}. The other parameters phi (shared, not adapted) collect
    grad_phi L_Q(theta^K) - alpha * sum_k d/dphi <grad_theta L_S(theta^k), v_{k+1}>: phi moves the inner
    gradients too, and <grad_theta L_S, v> differentiated by phi is exactly that mixed second derivative.
    """
    others = [n for n in params if n not in names]
    xp = backend.array_namespace(next(iter(params.values())))
    # Forward: the inner trajectory theta^0 .. theta^K (arrays), nothing recorded across steps.
    trajectory = [{n: xp.broadcast_to(params[n], (tasks.n_tasks,) + params[n].shape) for n in names}]
    fixed = {n: ad.Tensor(params[n]) for n in others}
    for _ in range(inner_steps):
        theta = {n: ad.Tensor(a, requires_grad=True) for n, a in trajectory[-1].items()}
        step = inner_step(apply, loss_fn, {**theta, **fixed}, tasks.support_x, tasks.support_y,
                          inner_lr, names, create_graph=False)
        trajectory.append({n: step[n].data for n in names})

    # v_K and grad_phi of the query loss at theta^K.
    theta = {n: ad.Tensor(a, requires_grad=True) for n, a in trajectory[-1].items()}
    phi = {n: ad.Tensor(params[n], requires_grad=True) for n in others}
    meta_loss = _task_loss(apply, loss_fn, {**theta, **phi}, tasks.query_x, tasks.query_y)
    grads = ad.grad(meta_loss, list(theta.values()) + list(phi.values()))
    v = {n: g.data for n, g in zip(names, grads)}
    phi_grad = {n: g.data for n, g in zip(others, grads[len(names):])}

    # Backward through the inner steps: v_k = v_{k+1} - alpha H_S(theta^k) v_{k+1}.
    for k in reversed(range(inner_steps)):
        theta = {n: ad.Tensor(a, requires_grad=True) for n, a in trajectory[k].items()}
        phi = {n: ad.Tensor(params[n], requires_grad=True) for n in others}
        support_loss = _task_loss(apply, loss_fn, {**theta, **phi}, tasks.support_x, tasks.support_y)
        inner_grads = ad.grad(support_loss, list(theta.values()), create_graph=True)
        alpha = {n: inner_lr[n] if isinstance(inner_lr, dict) else inner_lr for n in names}
        # <grad L_S, alpha v>: its gradient is H (alpha v) for theta and the mixed term for phi.
        directional = ad.sum(ad.stack([ad.sum(g * ad.Tensor(v[n] * alpha[n]))
                                       for n, g in zip(names, inner_grads)]))
        second = ad.grad(directional, list(theta.values()) + list(phi.values()))
        v = {n: v[n] - h.data for n, h in zip(names, second)}
        phi_grad = {n: phi_grad[n] - h.data for n, h in zip(others, second[len(names):])}

    grads = {n: v[n].sum(axis=0) for n in names}
    grads.update(phi_grad)
    return float(meta_loss.data), {n: grads[n] for n in params}
