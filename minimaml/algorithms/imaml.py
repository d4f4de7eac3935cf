"""iMAML, implicit MAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019, "Meta-Learning with Implicit
Gradients"). Each task's adapted parameters solve a proximal problem around theta,

    phi_i* = argmin_phi  L_{S_i}(phi) + (lambda / 2) ||phi - theta||^2,

here by ``inner_steps`` steps of gradient descent from theta (``proximal_adapt``). At the solution,
grad L_S(phi*) + lambda (phi* - theta) = 0, so by the implicit function theorem
d phi* / d theta = (I + H_{S_i}(phi*) / lambda)^{-1} and the meta-gradient is

    d L_{Q_i}(phi_i*) / d theta = (I + H_{S_i}(phi_i*) / lambda)^{-1} grad L_{Q_i}(phi_i*),

the solution x of (I + H/lambda) x = g by ``cg_steps`` of conjugate gradient (``linalg.conjugate_gradient``),
each step one exact Hessian-vector product of the support loss at phi* (``autodiff.hessian_product``).
Nothing of the inner loop is recorded: memory does not grow with ``inner_steps``.

Both solves are checked (``implicit_meta_gradient``'s metrics): the inner solve by its stationarity,
||grad P_i(phi_i)|| / ||grad P_i(theta)|| for the proximal objective P_i (how far from phi_i* it stopped,
relative to where it started; the worst task), and CG by its true residual ||g - A x|| / ||g|| (the
worst task). ``IMAML`` reports a step whose figures exceed ``tolerance`` as a failure
(``metrics["failure"]``), which the training loop acts on.

The authors' released code (aravindr93/imaml_dev, ``matrix_evaluator``) solves a damped system instead,

    A = (1 + cg_damping) I + H_{S_i}(phi_i*) / (lambda + lambda_damping),

their Omniglot command with cg_damping 1 and lambda_damping 10. It is positive definite unless H has an
eigenvalue below -(1 + cg_damping)(lambda + lambda_damping), where (I + H / lambda) already fails below
-lambda (a ReLU MLP's support Hessian can), at the price of no longer being the implicit gradient.
Both dampings 0 (the default) is the paper's A = I + H / lambda, which the checks verify.

The inner steps are plain gradient descent, as the authors' code's; a step size above 2 / (the largest
eigenvalue of H + lambda I) makes it oscillate instead of converging (meta-training can sharpen the
support loss that far: docs/followups.md), and ``backtracking=True`` solves the inner problem with
per-task step halving instead, to roundoff if given the steps.

Every parameter is adapted (the proximal term is over all of theta).
"""

from __future__ import annotations

import numpy

from .. import autodiff as ad
from .. import backend, linalg, maml
from .maml import MAML, check_inner_steps

TOLERANCE = 1e-3  # the largest inner-solve stationarity and CG residual an IMAML step may end with


def proximal_loss(task_loss, theta: dict, lam: float):
    """The task loss plus (lambda / 2) ||phi_i - theta||^2 per task, as a ``task_loss`` (``theta``: no task axis)."""
    anchor = {n: ad.Tensor(p.data if isinstance(p, ad.Tensor) else p) for n, p in theta.items()}

    def loss(params, data):
        total = task_loss(params, data)
        for n, a in anchor.items():
            difference = params[n] - a
            total = total + ad.sum(difference * difference, axis=tuple(range(1, difference.ndim))) * (lam / 2)
        return total
    return loss


def proximal_adapt(task_loss, params: dict, support, inner_lr: float, inner_steps: int, lam: float):
    """phi_i after ``inner_steps`` steps of phi <- phi - alpha (grad L_{S_i}(phi) + lambda (phi - theta)) from
    theta (``maml.adaptation_steps`` on the proximal loss); yields phi^0 .. phi^K (constants)."""
    return maml.adaptation_steps(proximal_loss(task_loss, params, lam), params, support, inner_lr, inner_steps)


def proximal_gradient(task_loss, theta: dict, phi: dict, support, lam: float) -> tuple:
    """Each task's proximal loss P_i(phi_i) = L_{S_i}(phi_i) + (lambda / 2) ||phi_i - theta||^2 ``(T,)`` and
    its gradient grad L_{S_i}(phi_i) + lambda (phi_i - theta) (a dict of ``(T, ...)`` arrays)."""
    loss = proximal_loss(task_loss, theta, lam)
    leaves = {n: ad.Tensor(p.data if isinstance(p, ad.Tensor) else p, requires_grad=True) for n, p in phi.items()}
    losses = loss(leaves, support)
    grads = ad.grad(ad.sum(losses), list(leaves.values()))
    return losses.data, {n: g.data for n, g in zip(leaves, grads)}


def backtracking_proximal_adapt(task_loss, params: dict, support, inner_lr: float, inner_steps: int, lam: float):
    """phi^0 .. phi^K like ``proximal_adapt``, but each task takes its step phi - rate grad P(phi) only if
    it lowers the task's proximal loss P by more than the loss's roundoff or, within that roundoff (near
    the solution, where the loss can no longer tell), lowers the gradient's norm; otherwise the task stays
    and halves its rate (per task, from ``inner_lr``). Gradient descent that cannot diverge, whatever the
    curvature, and converges to roundoff (the gradient test takes over where the loss test stalls, at
    |grad| ~ sqrt(eps |P|)). iMAML's gradient needs only phi*, not the path to it, so any solver of the
    inner problem will do (Rajeswaran et al. 2019). One gradient evaluation per step, at the candidate."""
    phi = {n: t.data for n, t in maml.per_task(params, support.n_tasks).items()}
    first = next(iter(phi.values()))
    xp = backend.array_namespace(first)
    roundoff = 16 * float(numpy.finfo(backend.to_numpy(first[:0]).dtype).eps)
    losses, grads = proximal_gradient(task_loss, params, phi, support, lam)
    norms = xp.sqrt(linalg.task_dot(grads, grads))
    rates = xp.full(support.n_tasks, inner_lr, dtype=first.dtype)
    yield {n: ad.Tensor(p) for n, p in phi.items()}
    for _ in range(inner_steps):
        candidate = {n: p - linalg.broadcast_tasks(rates, p) * grads[n] for n, p in phi.items()}
        new_losses, new_grads = proximal_gradient(task_loss, params, candidate, support, lam)
        new_norms = xp.sqrt(linalg.task_dot(new_grads, new_grads))
        slack = roundoff * xp.abs(losses)
        accept = (new_losses < losses - slack) | ((new_losses <= losses + slack) & (new_norms < norms))  # NaN: no
        phi = {n: xp.where(linalg.broadcast_tasks(accept, p), candidate[n], p) for n, p in phi.items()}
        grads = {n: xp.where(linalg.broadcast_tasks(accept, g), new_grads[n], g) for n, g in grads.items()}
        losses, norms = xp.where(accept, new_losses, losses), xp.where(accept, new_norms, norms)
        rates = xp.where(accept, rates, rates / 2)
        yield {n: ad.Tensor(p) for n, p in phi.items()}


def stationarity(task_loss, params: dict, phi: dict, support, lam: float) -> float:
    """How far the inner solve stopped from phi*: ||grad P_i(phi_i)|| / ||grad P_i(theta)||, the largest
    over the tasks (0 at the solution, 1 where it started; NaN or inf: it diverged). ``phi``: the
    adapted parameters ``(T, ...)``, ``params``: theta."""
    start = {n: t.data for n, t in maml.per_task(params, support.n_tasks).items()}
    _, initial = proximal_gradient(task_loss, params, start, support, lam)
    _, final = proximal_gradient(task_loss, params, phi, support, lam)
    xp = backend.array_namespace(next(iter(final.values())))
    before, after = xp.sqrt(linalg.task_dot(initial, initial)), xp.sqrt(linalg.task_dot(final, final))
    ratio = after / xp.where(before > 0, before, 1)
    return float(xp.where(xp.isfinite(ratio), ratio, xp.inf).max())


def proximal_solve(task_loss, params: dict, support, inner_lr: float, inner_steps: int, lam: float,
                   backtracking: bool = False) -> tuple:
    """(phi*, stationarity): each task's proximal solution after ``inner_steps`` steps (a dict of ``(T, ...)``
    arrays; ``backtracking``: by ``backtracking_proximal_adapt``, else plain gradient descent) and how far
    from stationary it stopped (``stationarity``)."""
    solver = backtracking_proximal_adapt if backtracking else proximal_adapt
    for adapted in solver(task_loss, params, support, inner_lr, inner_steps, lam):
        pass  # keep only the last step: nothing of the inner loop is held
    phi = {n: adapted[n].data for n in params}
    return phi, stationarity(task_loss, params, phi, support, lam)


def check_system(lam: float, cg_damping: float, lambda_damping: float) -> None:
    """Refuse a proximal term or CG dampings out of range, naming them."""
    if not lam > 0:
        raise ValueError(f"imaml: lambda (the proximal regularisation) must be positive, got {lam}")
    if not (cg_damping >= 0 and lambda_damping >= 0):
        raise ValueError(f"imaml: the CG dampings must be >= 0, got {cg_damping} and {lambda_damping}")


def implicit_gradient(task_loss, phi: dict, tasks, lam: float, cg_steps: int, query_loss=None,
                      cg_damping: float = 0.0, lambda_damping: float = 0.0) -> tuple:
    """(sum_i L_{Q_i}(phi_i), sum_i A_i^{-1} grad L_{Q_i}(phi_i), {"cg_residual": true relative residual, the
    worst task}) at given adapted parameters ``phi`` (``proximal_solve``'s), A_i = (1 + cg_damping) I +
    H_{S_i}(phi_i) / (lambda + lambda_damping): the paper's (I + H / lambda) with both dampings 0."""
    check_system(lam, cg_damping, lambda_damping)
    query_loss = task_loss if query_loss is None else query_loss
    names = list(phi)
    loss, g = ad.value_and_grad(lambda p: ad.sum(query_loss(p, tasks.query)), phi)
    hessian = ad.hessian_product(lambda *p: ad.sum(task_loss(dict(zip(names, p)), tasks.support)),
                                 [phi[n] for n in names])
    identity, curvature = 1.0 + cg_damping, 1.0 / (lam + lambda_damping)

    def matvec(v):  # A v, per task
        hv = hessian([v[n] for n in names])
        return {n: identity * v[n] + curvature * h for n, h in zip(names, hv)}

    solution = linalg.conjugate_gradient(matvec, g, cg_steps)
    return loss, {n: solution.x[n].sum(axis=0) for n in names}, {"cg_residual": solution.residual}


def implicit_meta_gradient(task_loss, params: dict, tasks, inner_lr: float, inner_steps: int, lam: float,
                           cg_steps: int, query_loss=None, cg_damping: float = 0.0, lambda_damping: float = 0.0,
                           backtracking: bool = False) -> tuple:
    """(meta-loss, meta-gradient, metrics): ``proximal_solve`` then ``implicit_gradient`` at its phi*; the
    metrics: ``imaml_stationarity`` (the inner solve's) and ``cg_residual`` (CG's true residual)."""
    check_system(lam, cg_damping, lambda_damping)
    phi, inner_stationarity = proximal_solve(task_loss, params, tasks.support, inner_lr, inner_steps, lam,
                                             backtracking)
    loss, grads, metrics = implicit_gradient(task_loss, phi, tasks, lam, cg_steps, query_loss, cg_damping,
                                             lambda_damping)
    return loss, grads, {"imaml_stationarity": inner_stationarity, **metrics}


def failure(metrics: dict, tolerance: float):
    """The one-line failure of an iMAML step whose inner solve or CG stopped above ``tolerance`` (None if
    both converged), naming the settings to change."""
    worst = metrics["imaml_stationarity"]
    if not worst <= tolerance:
        return (f"iMAML's inner solve did not converge (stationarity {worst:.2g} on the worst task, tolerance "
                f"{tolerance:g}): lower --imaml-inner-lr, raise --imaml-inner-steps or --imaml-lambda, or set "
                f"--imaml-backtracking (a ReLU network's kinks can stall it: docs/followups.md)")
    residual = metrics["cg_residual"]
    if not residual <= tolerance:
        return (f"iMAML's conjugate gradient did not converge (residual {residual:.2g} on the worst task, "
                f"tolerance {tolerance:g}): raise --imaml-cg-steps or damp the system (--imaml-cg-damping, "
                f"--imaml-lambda-damping)")
    return None


class IMAML(MAML):
    """iMAML with the authors' Omniglot command's settings by default (inner lr 0.1, 16 inner steps,
    lambda 2, 5 CG steps) and the paper's undamped system (``cg_damping = lambda_damping = 0``; their code's
    damping: 1 and 10); at test time the same proximal inner loop. ``tolerance``: the largest inner-solve
    stationarity and CG residual a step may end with; above it the step's ``metrics["failure"]`` says so."""

    name = "imaml"

    def __init__(self, inner_lr: float = 0.1, inner_steps: int = 16, *, lam: float = 2.0, cg_steps: int = 5,
                 cg_damping: float = 0.0, lambda_damping: float = 0.0, backtracking: bool = False,
                 tolerance: float = TOLERANCE):
        super().__init__(inner_lr, check_inner_steps(self.name, inner_steps))
        check_system(lam, cg_damping, lambda_damping)
        if int(cg_steps) != cg_steps or cg_steps < 1:
            raise ValueError(f"imaml: need cg_steps >= 1, got {cg_steps}")
        if not tolerance > 0:
            raise ValueError(f"imaml: tolerance must be positive, got {tolerance}")
        self.lam, self.cg_steps = float(lam), int(cg_steps)
        self.cg_damping, self.lambda_damping = float(cg_damping), float(lambda_damping)
        self.backtracking, self.tolerance = bool(backtracking), float(tolerance)

    def meta_gradient(self, task_loss, meta_params, tasks, iteration):
        loss, grads, metrics = implicit_meta_gradient(task_loss, meta_params, tasks, self.inner_lr,
                                                      self.inner_steps, self.lam, self.cg_steps,
                                                      cg_damping=self.cg_damping,
                                                      lambda_damping=self.lambda_damping,
                                                      backtracking=self.backtracking)
        failed = failure(metrics, self.tolerance)
        return loss, grads, {**metrics, **({"failure": failed} if failed else {})}

    def adaptation_steps(self, task_loss, meta_params, support, steps):
        solver = backtracking_proximal_adapt if self.backtracking else proximal_adapt
        return solver(task_loss, meta_params, support, self.inner_lr, steps, self.lam)
