"""Conjugate gradient, the one linear solver of minimaml: TRPO's natural-gradient step (F x = g) and
iMAML's implicit gradient ((I + H / lambda) x = g) both call ``conjugate_gradient``.

The systems come as a batch, one per task: ``b`` is a dict of arrays with a leading task axis ``(T, ...)``
and ``matvec`` applies a block-diagonal A (each block symmetric positive definite) to such a dict. TRPO
solves one system (T = 1). What CG ends with is checked, not trusted: the result carries the true
relative residual ||b - A x|| / ||b|| (one more product), not CG's running estimate, which keeps
shrinking in floating point after the true residual has levelled off.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import backend


@dataclass
class CGResult:
    """``x``: the solution (named and shaped like ``b``); ``product``: A x as CG's recurrence tracks it
    (b minus the running residual: free, and exact up to roundoff); ``residual``: the true relative
    residual ||b_i - A_i x_i|| / ||b_i||, the largest over the tasks; ``steps``: the steps taken."""

    x: dict
    product: dict
    residual: float
    steps: int


def task_dot(a: dict, b: dict):
    """<a_i, b_i> for every task i: ``(T,)`` (each a dot product of the flattened arrays)."""
    xp = backend.array_namespace(next(iter(a.values())))
    return sum(xp.stack([a[n][i].ravel() @ b[n][i].ravel() for i in range(a[n].shape[0])]) for n in a)


def broadcast_tasks(values, like):
    """``values (T,)`` shaped to multiply arrays ``like (T, ...)``."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def conjugate_gradient(matvec, b: dict, steps: int, stop_below: float = 0.0) -> CGResult:
    """x with A x ~= b by at most ``steps`` steps of conjugate gradient from x = 0, every task at once;
    ``stop_below``: stop early once every task's squared running residual ||r_i||^2 is below it (rllab's
    ``residual_tol``). A task whose search direction has no positive curvature stops moving."""
    xp = backend.array_namespace(next(iter(b.values())))
    x = {n: xp.zeros_like(v) for n, v in b.items()}
    r = {n: v.copy() for n, v in b.items()}
    p = {n: v.copy() for n, v in b.items()}
    rs = task_dot(r, r)
    taken = 0
    for _ in range(steps):
        if bool((rs < stop_below).all()):
            break
        ap = matvec(p)
        curvature = task_dot(p, ap)
        step = xp.where(curvature > 0, rs / xp.where(curvature > 0, curvature, 1), 0)
        x = {n: x[n] + broadcast_tasks(step, x[n]) * p[n] for n in x}
        r = {n: r[n] - broadcast_tasks(step, r[n]) * ap[n] for n in r}
        rs_new = task_dot(r, r)
        ratio = xp.where(rs > 0, rs_new / xp.where(rs > 0, rs, 1), 0)
        p = {n: r[n] + broadcast_tasks(ratio, p[n]) * p[n] for n in p}
        rs = rs_new
        taken += 1
    ax = matvec(x)
    error = {n: b[n] - ax[n] for n in b}
    b_norm = xp.sqrt(task_dot(b, b))
    residual = xp.sqrt(task_dot(error, error)) / xp.where(b_norm > 0, b_norm, 1)
    return CGResult(x, {n: b[n] - r[n] for n in b}, float(residual.max()), taken)
