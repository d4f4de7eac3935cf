"""iMAML, implicit MAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019, "Meta-Learning with Implicit
Gradients"). Each task's adapted parameters solve a proximal problem around theta,

    phi_i* = argmin_phi  L_{S_i}(phi) + (lambda / 2) ||phi - theta||^2,

here by ``inner_steps`` steps of gradient descent from theta (``proximal_adapt``). At the solution,
grad L_S(phi*) + lambda (phi* - theta) = 0, so by the implicit function theorem
d phi* / d theta = (I + H_{S_i}(phi*) / lambda)^{-1} and the meta-gradient is

    d L_{Q_i}(phi_i*) / d theta = (I + H_{S_i}(phi_i*) / lambda)^{-1} grad L_{Q_i}(phi_i*),

the solution x of (I + H/lambda) x = g by ``cg_steps`` of conjugate gradient (``conjugate_gradient``),
each step one exact Hessian-vector product of the support loss at phi* (``autodiff.hessian_product``).
Nothing of the inner loop is recorded: memory does not grow with ``inner_steps``. The CG residual
||g - A x|| / ||g|| (largest over the tasks) is returned with the gradient.

The authors' released code (aravindr93/imaml_dev, ``matrix_evaluator``) solves a damped system instead,

    A = (1 + cg_damping) I + H_{S_i}(phi_i*) / (lambda + lambda_damping),

their Omniglot command with cg_damping 1 and lambda_damping 10. It is positive definite unless H has an
eigenvalue below -(1 + cg_damping)(lambda + lambda_damping), where (I + H / lambda) already fails below
-lambda (a ReLU MLP's support Hessian can), at the price of no longer being the implicit gradient.
Both dampings 0 (the default) is the paper's A = I + H / lambda, which the checks verify.

The inner steps are plain gradient descent, as the authors' code's; meta-training can make the support
loss so sharp that a step overshoots (measured on the sinusoid, docs/followups.md), and
``backtracking=True`` solves the inner problem with per-task step halving instead.

Every parameter is adapted (the proximal term is over all of theta).
"""

from __future__ import annotations

from .. import autodiff as ad
from .. import backend, maml
from .maml import MAML, check_inner_steps


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


def backtracking_proximal_adapt(task_loss, params: dict, support, inner_lr: float, inner_steps: int, lam: float):
    """phi^0 .. phi^K like ``proximal_adapt``, but a task whose step would not lower its proximal loss
    does not take it and halves its step size (per task, from ``inner_lr``): gradient descent that
    cannot diverge, whatever the curvature. iMAML's gradient needs only phi*, not the path to it, so any
    solver of the inner problem will do (Rajeswaran et al. 2019). One more forward pass per step."""
    loss = proximal_loss(task_loss, params, lam)
    phi = {n: t.detach() for n, t in maml.per_task(params, support.n_tasks).items()}
    first = next(iter(phi.values()))
    xp = backend.array_namespace(first.data)
    rates = xp.full(support.n_tasks, inner_lr, dtype=first.dtype)
    with ad.no_grad():
        current = loss(phi, support).data
    yield phi
    for _ in range(inner_steps):
        step_sizes = {n: ad.Tensor(_per_task(rates, p)) for n, p in phi.items()}
        candidate = maml.inner_step(loss, phi, support, step_sizes)
        with ad.no_grad():
            candidate_loss = loss(candidate, support).data
        lower = candidate_loss <= current  # False for NaN
        phi = {n: ad.Tensor(xp.where(_per_task(lower, p), candidate[n].data, p.data)) for n, p in phi.items()}
        current = xp.where(lower, candidate_loss, current)
        rates = xp.where(lower, rates, rates / 2)
        yield phi


def _dot(a: dict, b: dict):
    """<a_i, b_i> per task: ``(T,)``."""
    return sum((a[n] * b[n]).reshape(a[n].shape[0], -1).sum(axis=1) for n in a)


def _per_task(scalar, like):
    return scalar.reshape((-1,) + (1,) * (like.ndim - 1))


def conjugate_gradient(matvec, b: dict, steps: int) -> tuple:
    """x with matvec(x) ~= b by ``steps`` of conjugate gradient from x = 0, for every task at once
    (``b``: dict of ``(T, ...)`` arrays; the matrix is block diagonal over the tasks, each block symmetric
    positive definite). Returns ``(x, relative residual ||r_i|| / ||b_i||, largest over tasks)``."""
    xp = backend.array_namespace(next(iter(b.values())))
    x = {n: xp.zeros_like(v) for n, v in b.items()}
    r = {n: v.copy() for n, v in b.items()}
    p = {n: v.copy() for n, v in b.items()}
    rs = _dot(r, r)
    b_norm = xp.sqrt(rs)
    for _ in range(steps):
        ap = matvec(p)
        curvature = _dot(p, ap)
        step = xp.where(curvature > 0, rs / xp.where(curvature > 0, curvature, 1), 0)
        x = {n: x[n] + _per_task(step, x[n]) * p[n] for n in x}
        r = {n: r[n] - _per_task(step, r[n]) * ap[n] for n in r}
        rs_new = _dot(r, r)
        ratio = xp.where(rs > 0, rs_new / xp.where(rs > 0, rs, 1), 0)
        p = {n: r[n] + _per_task(ratio, p[n]) * p[n] for n in p}
        rs = rs_new
    residual = xp.sqrt(rs) / xp.where(b_norm > 0, b_norm, 1)
    return x, float(residual.max())


def check_system(lam: float, cg_damping: float, lambda_damping: float) -> None:
    """Refuse a proximal term or CG dampings out of range, naming them."""
    if not lam > 0:
        raise ValueError(f"imaml: lambda (the proximal regularisation) must be positive, got {lam}")
    if not (cg_damping >= 0 and lambda_damping >= 0):
        raise ValueError(f"imaml: the CG dampings must be >= 0, got {cg_damping} and {lambda_damping}")


def implicit_meta_gradient(task_loss, params: dict, tasks, inner_lr: float, inner_steps: int, lam: float,
                           cg_steps: int, query_loss=None, cg_damping: float = 0.0, lambda_damping: float = 0.0,
                           backtracking: bool = False) -> tuple:
    """(sum_i L_{Q_i}(phi_i*), sum_i A_i^{-1} grad L_{Q_i}(phi_i*), CG residual), A_i = (1 + cg_damping) I
    + H_{S_i}(phi_i*) / (lambda + lambda_damping): the paper's (I + H / lambda) with both dampings 0.
    ``backtracking``: phi* by ``backtracking_proximal_adapt`` instead of plain gradient descent."""
    check_system(lam, cg_damping, lambda_damping)
    query_loss = task_loss if query_loss is None else query_loss
    solver = backtracking_proximal_adapt if backtracking else proximal_adapt
    for adapted in solver(task_loss, params, tasks.support, inner_lr, inner_steps, lam):
        pass  # keep only the last step: nothing of the inner loop is held
    names = list(params)
    phi = {n: adapted[n].data for n in names}

    leaves = {n: ad.Tensor(phi[n], requires_grad=True) for n in names}
    query = ad.sum(query_loss(leaves, tasks.query))
    g = {n: d.data for n, d in zip(names, ad.grad(query, list(leaves.values())))}

    hessian = ad.hessian_product(lambda *p: ad.sum(task_loss(dict(zip(names, p)), tasks.support)),
                                 [phi[n] for n in names])

    identity, curvature = 1.0 + cg_damping, 1.0 / (lam + lambda_damping)

    def matvec(v):  # A v, per task
        hv = hessian([v[n] for n in names])
        return {n: identity * v[n] + curvature * h for n, h in zip(names, hv)}

    x, residual = conjugate_gradient(matvec, g, cg_steps)
    return float(query.data), {n: x[n].sum(axis=0) for n in names}, residual


class IMAML(MAML):
    """iMAML with the authors' Omniglot command's settings by default (inner lr 0.1, 16 inner steps,
    lambda 2, 5 CG steps) and the paper's undamped system (``cg_damping = lambda_damping = 0``; their code's
    damping: 1 and 10); at test time the same proximal inner loop."""

    name = "imaml"

    def __init__(self, inner_lr: float = 0.1, inner_steps: int = 16, *, lam: float = 2.0, cg_steps: int = 5,
                 cg_damping: float = 0.0, lambda_damping: float = 0.0, backtracking: bool = False):
        super().__init__(inner_lr, check_inner_steps(self.name, inner_steps))
        check_system(lam, cg_damping, lambda_damping)
        if int(cg_steps) != cg_steps or cg_steps < 1:
            raise ValueError(f"imaml: need cg_steps >= 1, got {cg_steps}")
        self.lam, self.cg_steps = float(lam), int(cg_steps)
        self.cg_damping, self.lambda_damping = float(cg_damping), float(lambda_damping)
        self.backtracking = bool(backtracking)

    def meta_gradient(self, task_loss, meta_params, tasks, iteration):
        loss, grads, residual = implicit_meta_gradient(task_loss, meta_params, tasks, self.inner_lr,
                                                       self.inner_steps, self.lam, self.cg_steps,
                                                       cg_damping=self.cg_damping,
                                                       lambda_damping=self.lambda_damping,
                                                       backtracking=self.backtracking)
        return loss, grads, {"cg_residual": residual}

    def adaptation_steps(self, task_loss, meta_params, support, steps):
        solver = backtracking_proximal_adapt if self.backtracking else proximal_adapt
        return solver(task_loss, meta_params, support, self.inner_lr, steps, self.lam)
