"""Exact meta-gradients of a case: the algorithm's own (the reference) and those of the classic mistakes.

The reference comes from minimaml's algorithms, each checked against finite differences and
independent references (``python -m minimaml.verify``); ``reference`` is the one place the doctor calls
them. A mistake is the same meta-objective with one thing changed on purpose (``mistakes``), computed
exactly by ``unrolled``: the inner loop written out once,

    theta_i^{k+1} = theta_i^k - rate_k (.) grad L_{S_i}(theta_i^k),    L = c sum_k w_k sum_i L_{Q_i}(theta_i^k),

with each mistake a switch of it (the inner gradient a constant, batch-norm statistics constants or
running ones, K +- 1 steps, the rate squared or 1, support and query swapped, fewer parameters adapted,
the rates constants). ``unrolled`` with no switch is the reference itself (tests/test_doctor.py checks
it to ~1e-12): the mistakes differ from the exact gradient by their switch alone. iMAML's mistakes that keep its implicit
gradient (the rate, swapped sets) go through ``reference`` on the changed case; its first-order
mistake is the system without the Hessian, A = I.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from .. import autodiff as ad
from .. import algorithms, maml
from ..algorithms import anil
from ..tasks.batch import TaskBatch

# iMAML: the stationarity of its inner solve and the residual of its linear solve that count as exact
STATIONARY = {"float64": 1e-12, "float32": 1e-5}
NO_HESSIAN = 1e200  # iMAML's lambda_damping that makes its system A = I + H / (lambda + this) = I


class NoExactReference(ValueError):
    """No exact gradient to give: an iterative solve (iMAML's) did not converge, an algorithm reported a
    failure, or the meta-gradient is not finite."""


def reference(case, tasks=None, inner_lr=None, inner_steps=None, first_order: bool = False,
              inner_solution: bool = True) -> tuple:
    """(meta-loss, {name: meta-gradient}) of ``case`` by minimaml's algorithm, optionally on other ``tasks``,
    another ``inner_lr`` / ``inner_steps``, or first order. ``inner_solution``: iMAML's inner problem must be
    solved (stationary to ``STATIONARY``; a mistake's need not be). The doctor's only use of
    ``minimaml.algorithms``."""
    tasks = case.tasks if tasks is None else tasks
    lr = case.inner_lr if inner_lr is None else inner_lr
    steps = case.inner_steps if inner_steps is None else inner_steps
    inner, name = case.spec["inner"], case.algorithm
    if name in ("maml", "anil"):  # ANIL is MAML adapting the case's head
        name, options = "maml", {"mode": "first_order" if first_order else "second_order",
                                 "inner_param_names": case.adapted}
    elif name == "meta_sgd":  # lr: unused, the rates are the case's alpha/<name>
        lr, options = 1.0, {"inner_param_names": case.adapted}
    elif name == "maml_pp":  # lr: unused, the rates are the case's lslr/<name>
        lr, options = 1.0, {"inner_param_names": case.adapted, "step_weights": case.spec["step_weights"],
                            "per_step_bn": False, "first_order_epochs": 1 if first_order else 0,
                            "iterations_per_epoch": 1}
    else:
        if case.adapted != case.param_names:
            raise ValueError(f"doctor: {case.name}: iMAML adapts every parameter; inner.adapted lists only "
                             f"{case.adapted}")
        options = {"lam": inner["lambda"], "cg_steps": inner["cg_steps"],
                   "lambda_damping": NO_HESSIAN if first_order else 0.0,
                   "tolerance": STATIONARY[str(case.dtype)] if inner_solution else numpy.inf}
    algorithm = algorithms.make(name, lr, steps, **options)
    with numpy.errstate(over="ignore", invalid="ignore"):
        loss, grads, metrics = algorithm.meta_gradient(case.task_loss(), case.meta_params, tasks, 0)
    if metrics.get("failure"):  # an algorithm that says its numerics failed
        raise NoExactReference(f"doctor: {case.name}: {metrics['failure']}")
    if case.algorithm == "imaml" and metrics["cg_residual"] > STATIONARY[str(case.dtype)]:
        raise NoExactReference(f"doctor: {case.name}: iMAML's conjugate gradient stopped at a relative residual "
                               f"of {metrics['cg_residual']:.1e}, so there is no exact reference: raise "
                               f"inner.cg_steps, or make I + H / lambda better conditioned (a larger lambda)")
    if not all(numpy.isfinite(grads[n]).all() for n in case.meta_names):
        raise NoExactReference(f"doctor: {case.name}: the meta-gradient is not finite (an inner loop that "
                               f"diverges: a smaller inner rate, or fewer steps)")
    return loss * case.scale, {n: grads[n] * case.scale for n in case.meta_names}


def head_names(case) -> list:
    """The model's last layer (``head.*``, else the last ``layer{i}.*``)."""
    return anil.head_names({n: None for n in case.param_names})


@dataclass(frozen=True)
class Mistake:
    """One classic mistake: ``key``, the ``cause`` in PyTorch/JAX terms, and its switches of ``unrolled``."""

    key: str
    cause: str
    first_order: bool = False
    batch_norm: str = "batch"  # "constant": the inner step's statistics constants; "running": eval mode
    extra_steps: int = 0
    rate: str = "alpha"  # "alpha", "alpha^2" (applied twice), "1" (not applied), "constant" (not learned)
    swapped: bool = False
    left_out: tuple = ()


def mistakes(case) -> list:
    """The classic mistakes that make sense for ``case`` (and that differ from the exact gradient)."""
    k = case.inner_steps
    first_order = ("the inner gradient is not differentiated: first-order MAML (PyTorch: "
                   "torch.autograd.grad(..., create_graph=False) or a .detach() in the inner step; JAX: "
                   "jax.lax.stop_gradient on the inner gradient; learn2learn/higher: first_order=True)")
    if case.algorithm == "imaml":
        first_order = ("the implicit system left out: grad L_Q(phi) summed over tasks, without solving "
                       "(I + H / lambda) x = grad L_Q(phi) (first-order iMAML)")
    found = [
        Mistake("first order", first_order, first_order=True),
        Mistake("one step too many", f"{k + 1} inner steps instead of {k} (a loop bound off by one)", extra_steps=1),
        Mistake("inner rate applied twice", "the inner rate applied twice: theta - alpha^2 grad (the gradient "
                "already scaled by alpha before the step multiplies by alpha again)", rate="alpha^2"),
        Mistake("inner rate not applied", "the inner rate not applied: theta - grad (the learning rate left out "
                "of the fast-weight update)", rate="1"),
        Mistake("support and query swapped", "support and query swapped: the inner step on the query set and "
                "the meta-loss on the support set", swapped=True),
        Mistake("no adaptation", "no adaptation at all: the gradient of the query loss at theta (e.g. the query "
                "forward pass run with the model's own weights instead of the fast weights)", extra_steps=-k),
    ]
    if k > 1:
        found.append(Mistake("one step too few", f"{k - 1} inner steps instead of {k} (a loop bound off by one)",
                             extra_steps=-1))
    if case.algorithm == "imaml":  # its gradient is taken at the inner solution, whatever the path to it
        return [m for m in found if m.extra_steps in (0, -k)]
    if case.algorithm == "maml_pp":  # its rates and step weights are per step: K +- 1 has no one meaning
        found = [m for m in found if m.extra_steps in (0, -k)]
    if case.has_batch_norm():
        found.append(Mistake("batch-norm statistics constant", "batch-norm statistics treated as constants in "
                             "the inner step: the batch mean and variance detached, so no derivative flows "
                             "through them (e.g. computed outside the graph or under torch.no_grad)",
                             batch_norm="constant"))
        found.append(Mistake("batch norm in eval mode", "batch norm in evaluation mode throughout: fresh running "
                             "statistics (mean 0, variance 1) instead of each batch's (PyTorch: model.eval(), or "
                             "F.batch_norm(..., training=False) with the module's running_mean/running_var)",
                             batch_norm="running"))
    head = head_names(case)
    if set(head) < set(case.adapted):
        found.append(Mistake("head only", f"only the head ({', '.join(head)}) adapted in the inner step, the "
                             f"rest held at theta", left_out=tuple(n for n in case.adapted if n not in head)))
    if len(case.adapted) > 1:
        found += [Mistake(f"{name} not adapted", f"{name} left out of the inner step (missing from the fast "
                          f"weights, or from the inputs of the inner torch.autograd.grad / jax.grad)",
                          left_out=(name,)) for name in case.adapted]
    if case.algorithm in ("meta_sgd", "maml_pp"):
        found.append(Mistake("learned rates constant", "the learned inner rates get no meta-gradient of their "
                             "own: they enter the inner step as constants (detached, or left out of the "
                             "differentiated inputs)", rate="constant"))
    return found


def _step_rate(case, leaves: dict, name: str, k: int, mistake: Mistake):
    """The rate of parameter ``name`` at inner step ``k``: alpha, Meta-SGD's alpha/<name>, MAML++'s
    lslr/<name>[k]; then the mistake's change."""
    if case.algorithm == "meta_sgd":
        rate = leaves["alpha/" + name]
    elif case.algorithm == "maml_pp":
        rate = leaves["lslr/" + name][k]
    else:
        rate = case.inner_lr
    if mistake.rate == "alpha^2":
        return rate * rate
    if mistake.rate == "1":
        return 1.0
    if mistake.rate == "constant":
        return ad.Tensor(rate.data)
    return rate


def swapped(tasks: TaskBatch) -> TaskBatch:
    return TaskBatch(tasks.query, tasks.support)


def unrolled(case, mistake: Mistake) -> dict:
    """The exact meta-gradient of ``case`` with ``mistake`` put in (module docstring)."""
    leaves = {n: ad.Tensor(p, requires_grad=True) for n, p in case.meta_params.items()}
    tasks = swapped(case.tasks) if mistake.swapped else case.tasks
    support_loss = case.task_loss(mistake.batch_norm)
    query_loss = case.task_loss("running" if mistake.batch_norm == "running" else "batch")
    steps = case.inner_steps + mistake.extra_steps
    weights = case.spec["step_weights"] if case.algorithm == "maml_pp" else [0.0] * (steps - 1) + [1.0]
    names = [n for n in case.adapted if n not in mistake.left_out]
    theta = maml.per_task({n: leaves[n] for n in case.param_names}, tasks.n_tasks, names)
    objective = ad.sum(query_loss(theta, tasks.query)) if steps == 0 else 0.0
    for k in range(steps):
        support = ad.sum(support_loss(theta, tasks.support))
        inner_grads = ad.grad(support, [theta[n] for n in names], create_graph=not mistake.first_order)
        theta = {**theta, **{n: theta[n] - _step_rate(case, leaves, n, k, mistake) * g
                             for n, g in zip(names, inner_grads)}}
        if weights[k]:
            objective = objective + ad.sum(query_loss(theta, tasks.query)) * float(weights[k])
    grads = ad.grad(objective * case.scale, list(leaves.values()))
    return {n: g.data for n, g in zip(leaves, grads)}


def mistake_gradient(case, mistake: Mistake) -> dict:
    """The exact meta-gradient of ``mistake`` on ``case``."""
    if case.algorithm != "imaml" or mistake.extra_steps == -case.inner_steps:
        return unrolled(case, mistake)
    lr = {"alpha": case.inner_lr, "alpha^2": case.inner_lr ** 2, "1": 1.0}[mistake.rate]
    return reference(case, swapped(case.tasks) if mistake.swapped else None, lr,
                     case.inner_steps + mistake.extra_steps, mistake.first_order, inner_solution=False)[1]

