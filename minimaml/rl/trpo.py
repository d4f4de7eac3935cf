"""TRPO (Schulman et al. 2015) as the MAML-RL meta-optimizer, with exact Fisher-vector products.

One step, for a surrogate loss L(theta) and the mean KL divergence D(theta) = KL(pi_old || pi_theta)
(``objective(params, create_graph) -> (L, D)``, both scalar Tensors, "old" frozen at theta_old):

    g     = grad L(theta_old)
    F v   = grad_theta < grad_theta D(theta), v >  at theta_old    (+ damping * v)
    x     ~ F^-1 g                               conjugate gradient, 10 iterations (``linalg``)
    s     = sqrt(2 delta / x^T F x) x            the step that reaches KL ~ delta to second order;
                                                 F x = g - r from CG's residual r (no extra product)
    theta = theta_old - 0.8^k s                  smallest k in 0..14 with L < L_old and D <= delta;
                                                 theta_old when there is none (rllab's rule)

F is the Hessian of D at theta_old, computed exactly. By default (``fisher_vector_product``) the tape
differentiates grad D once more (reverse over reverse). In MAML-RL, D depends on theta through the inner
update theta'_i(theta), so that product needs third derivatives of the policy; the step can instead be
given the same F in a cheaper form, ``fisher_product`` (MAML-TRPO's: ``maml_rl.meta_fisher_product``,
F = sum_i J_i^T F'_i J_i from second-order products only). The paper used finite differences of grad D.

CG and the line search work on flat float64 host vectors (``flatten`` / ``unflatten``). ``TRPO`` holds
the settings and takes the step, as ``optim.Adam`` does for the supervised meta-gradient.

Under MPI (``minimaml.distributed``) L and D are sums over ranks: each rank's objective sums its share
of the tasks divided by the global task count (``maml_rl.task_mean``). With ``over_ranks=True`` the step
adds the ranks' parts of g, of every F v (damping added once, after the sum) and of the losses and KLs
of the line search (``distributed.all_reduce``), so CG and the line search run alike on every rank and
every rank ends with the same parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from minimaml import autodiff as ad
from minimaml import backend, distributed, linalg


def flatten(arrays) -> np.ndarray:
    """Arrays or Tensors (any device, dtype) -> one float64 host vector."""
    return np.concatenate([backend.to_numpy(a.data if isinstance(a, ad.Tensor) else a).astype(np.float64).ravel()
                           for a in arrays])


def unflatten(vector: np.ndarray, like) -> list:
    """The inverse of ``flatten``: arrays shaped, typed and placed like ``like``."""
    out, start = [], 0
    for a in like:
        a = a.data if isinstance(a, ad.Tensor) else a
        piece = vector[start:start + a.size].reshape(a.shape)
        out.append(backend.array_namespace(a).asarray(piece, dtype=a.dtype))
        start += a.size
    if start != vector.size:
        raise ValueError(f"unflatten: vector has {vector.size} entries, the arrays {start}")
    return out


def conjugate_gradient(matvec, b: np.ndarray, iters: int = 10, residual_tol: float = 1e-10) -> tuple:
    """Approximately solve A x = b for a symmetric positive-definite A given as ``matvec(v) = A v`` on
    flat vectors (rllab's ``krylov.cg``: x_0 = 0, stop after ``iters`` steps or when |r|^2 < residual_tol),
    by ``linalg.conjugate_gradient`` on one system.

    Returns ``(x, A x, residual)``: A x as CG's recurrence tracks it (b - r, from the products it makes
    anyway), and the true relative residual ||b - A x|| / ||b|| (one more product)."""
    result = linalg.conjugate_gradient(lambda v: {"x": matvec(v["x"][0])[None]}, {"x": b[None]}, iters, residual_tol)
    return result.x["x"][0], result.product["x"][0], result.residual


def kl_hessian_product(kl, leaves: list):
    """v -> (Hessian of ``kl`` w.r.t. ``leaves``) v, flat float64 vectors.

    ``kl`` must be recorded from ``leaves`` with every inner gradient built with ``create_graph=True``.
    grad D is recorded once; each product is one more reverse pass through it.
    """
    hessian = ad.gradient_product(ad.grad(kl, leaves, create_graph=True), leaves)

    def product(v: np.ndarray) -> np.ndarray:
        return flatten(hessian(unflatten(v, leaves)))

    return product


def fisher_vector_product(kl, leaves: list, damping: float = 1e-5):
    """v -> (Hessian of ``kl`` w.r.t. ``leaves``) v + damping v, flat float64 vectors
    (``kl_hessian_product`` with damping)."""
    product = kl_hessian_product(kl, leaves)

    def fvp(v: np.ndarray) -> np.ndarray:
        return product(v) + damping * v

    return fvp


def line_search(evaluate, theta: np.ndarray, step: np.ndarray, loss_before: float, max_kl: float,
                backtrack_ratio: float = 0.8, max_backtracks: int = 15):
    """Backtrack theta - ratio^k step, k = 0, 1, ...: accept the first candidate whose loss improves on
    ``loss_before`` with KL <= ``max_kl`` (both finite). ``evaluate(flat) -> (loss, kl)`` floats.

    Returns (theta_new, info): theta itself and ``accepted=False`` when no candidate qualifies.
    """
    for k in range(max_backtracks):
        candidate = theta - backtrack_ratio**k * step
        loss, kl = evaluate(candidate)
        if math.isfinite(loss) and math.isfinite(kl) and loss < loss_before and kl <= max_kl:
            return candidate, {"accepted": True, "backtracks": k, "loss_after": loss, "kl": kl}
    return theta, {"accepted": False, "backtracks": max_backtracks, "loss_after": loss_before, "kl": 0.0}


def trpo_step(objective, params: dict, max_kl: float = 0.01, cg_iters: int = 10, damping: float = 1e-5,
              backtrack_ratio: float = 0.8, max_backtracks: int = 15, fisher_product=None, over_ranks: bool = False):
    """One TRPO update of ``params`` (dict of arrays); returns (new params dict, stats).

    ``objective(params: dict of Tensors, create_graph: bool) -> (loss, mean_kl)`` scalar Tensors; with
    ``create_graph=False`` it only needs values. ``fisher_product``: optional, ``params -> (v -> F v)``
    on dicts of arrays named like ``params``, the Hessian of the mean KL at ``params`` in a form cheaper
    than the tape's reverse over reverse (default). ``over_ranks=True``: ``objective`` (and
    ``fisher_product``) give this rank's part of sums over the MPI ranks, which the step adds up (module
    docstring); in one process that changes nothing. Stats: loss before/after, kl, the gradient's norm,
    CG's true relative residual ``cg_residual`` and the line search's outcome.
    """
    def summed(vector: np.ndarray) -> np.ndarray:
        """The ranks' parts of ``vector`` added up, on every rank (with ``over_ranks``)."""
        return distributed.all_reduce({"sum": vector})["sum"] if over_ranks else vector

    def values(*scalars) -> list:
        """Scalar Tensors as floats, summed over the ranks."""
        return [float(x) for x in summed(np.array([s.item() for s in scalars]))]

    names = list(params)
    leaves = [ad.Tensor(params[k], requires_grad=True) for k in names]
    loss, kl = objective(dict(zip(names, leaves)), create_graph=True)
    g = summed(flatten(ad.grad(loss, leaves)))
    if fisher_product is None:
        product = kl_hessian_product(kl, leaves)
    else:
        product_at_params = fisher_product(params)

        def product(v: np.ndarray) -> np.ndarray:
            fisher_v = product_at_params(dict(zip(names, unflatten(v, leaves))))
            return flatten(fisher_v[k] for k in names)

    def fvp(v: np.ndarray) -> np.ndarray:
        return summed(product(v)) + damping * v

    x, fisher_x, cg_residual = conjugate_gradient(fvp, g, cg_iters)
    step = math.sqrt(2 * max_kl / (x @ fisher_x + 1e-8)) * x

    def evaluate(flat):
        candidate = [ad.Tensor(a, requires_grad=True) for a in unflatten(flat, leaves)]
        return values(*objective(dict(zip(names, candidate)), create_graph=False))

    [loss_before] = values(loss)
    theta, info = line_search(evaluate, flatten(leaves), step, loss_before, max_kl, backtrack_ratio, max_backtracks)
    new_params = dict(zip(names, unflatten(theta, leaves))) if info["accepted"] else dict(params)
    return new_params, {"loss_before": loss_before, **info, "grad_norm": float(np.linalg.norm(g)),
                        "cg_residual": cg_residual}


@dataclass(frozen=True)
class TRPO:
    """TRPO's settings: the trust region ``max_kl`` (delta), CG's iterations and damping, the line
    search's backtracking. ``step(objective, params, fisher_product=None, over_ranks=False)`` is
    ``trpo_step`` with them."""

    max_kl: float = 0.01
    cg_iters: int = 10
    damping: float = 1e-5
    backtrack_ratio: float = 0.8
    max_backtracks: int = 15

    def step(self, objective, params: dict, fisher_product=None, over_ranks: bool = False):
        return trpo_step(objective, params, self.max_kl, self.cg_iters, self.damping, self.backtrack_ratio,
                         self.max_backtracks, fisher_product, over_ranks)
