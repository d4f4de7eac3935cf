"""``check_grads``: compare the tape's derivatives, up to any order, with finite differences.

For a function ``f`` of some arrays, the k-th derivative is checked along random directions:

- s_1(x) = <f(x), u>, a scalar (u random), so vector-valued functions are checked through their VJP;
- for k = 1, 2, ...: for each input i, the tape's directional derivative <grad_i s_k(x), v_i> is
  compared with the five-point central difference
  (-s(x + 2h v) + 8 s(x + h v) - 8 s(x - h v) + s(x - 2h v)) / (12 h), with v in input i only;
- s_{k+1}(x) = sum_i <grad_i s_k(x), w_i> is the tape's derivative contracted with random w, so the
  next order differentiates the tape's own reverse pass (recorded with ``create_graph=True``).

Everything runs in float64. The relative error is ``|tape - fd| / max(|tape|, |fd|, atol / rtol)``
(derivatives smaller than ``atol / rtol`` are compared absolutely, to ``atol``); a check passes when it
is at most ``rtol``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from .. import backend
from .ops import multiply, sum as tsum
from .tensor import Tensor, grad


class GradCheckError(AssertionError):
    """A derivative disagrees with its finite-difference estimate."""


@dataclass
class DerivativeCheck:
    order: int  # which derivative: 1 = gradient, 2 = Hessian, ...
    input: int  # which input was perturbed
    tape: float  # the tape's directional derivative
    finite_difference: float
    abs_error: float
    rel_error: float
    ok: bool


@dataclass
class GradCheckReport:
    checks: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def max_rel_error(self, order: int) -> float:
        errors = [c.rel_error for c in self.checks if c.order == order]
        return max(errors) if errors else float("nan")

    def __str__(self) -> str:
        lines = ["order input  tape                 finite difference     rel. error"]
        for c in self.checks:
            flag = "" if c.ok else "  FAIL"
            lines.append(f"{c.order:5d} {c.input:5d}  {c.tape: .14e} {c.finite_difference: .14e}  "
                         f"{c.rel_error:.2e}{flag}")
        return "\n".join(lines)


def _inner(a: Tensor, b) -> Tensor:
    return tsum(multiply(a, Tensor(b)))


def check_grads(f, inputs, order: int = 2, rtol: float = 1e-6, atol: float = 1e-9,
                step: float = 1e-4, seed: int = 0, raise_on_failure: bool = True) -> GradCheckReport:
    """Check every derivative of ``f`` up to ``order`` at ``inputs`` against finite differences.

    ``f``: a function of Tensors (one per input) returning a Tensor of any shape.
    ``inputs``: arrays (float64; other float dtypes are refused, since finite differences need float64).
    ``step``: the finite-difference step h, relative to each input's scale (at least 1).
    Returns a ``GradCheckReport`` (printable); raises ``GradCheckError`` on failure unless
    ``raise_on_failure=False``.
    """
    inputs = [x.data if isinstance(x, Tensor) else x for x in inputs]
    for i, x in enumerate(inputs):
        if x.dtype != numpy.float64:
            raise TypeError(f"check_grads: input {i} has dtype {x.dtype}; finite differences need float64")
    xp = backend.array_namespace(inputs[0])
    rng = numpy.random.default_rng(seed)

    def random_like(x):
        return xp.asarray(rng.standard_normal(x.shape))

    output_shape = f(*[Tensor(x, requires_grad=True) for x in inputs]).shape
    u = xp.asarray(rng.standard_normal(output_shape))

    def scalar_fn(k: int):
        """s_k as a function of arrays: (value Tensor, leaves) with the graph kept for further orders."""
        def s(arrays, create_graph):
            leaves = [Tensor(x, requires_grad=True) for x in arrays]
            value = _inner(f(*leaves), u)
            for w in directions[:k - 1]:
                grads = grad(value, leaves, create_graph=True)
                value = tsum(multiply(grads[0], Tensor(w[0])))
                for g, wi in zip(grads[1:], w[1:]):
                    value = value + tsum(multiply(g, Tensor(wi)))
            return value, leaves
        return s

    directions = [[random_like(x) for x in inputs] for _ in range(order)]
    report = GradCheckReport()
    for k in range(1, order + 1):
        s = scalar_fn(k)
        value, leaves = s(inputs, create_graph=False)
        tape_grads = grad(value, leaves)
        for i, x in enumerate(inputs):
            v = random_like(x)
            scale = float(xp.max(xp.abs(x))) if x.size else 1.0
            h = step * max(scale, 1.0)

            def at(t):
                shifted = list(inputs)
                shifted[i] = x + t * v
                return float(s(shifted, create_graph=False)[0].data)

            fd = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
            tape = float(xp.sum(tape_grads[i].data * v))
            abs_error = abs(tape - fd)
            rel_error = abs_error / max(abs(tape), abs(fd), atol / rtol)
            ok = rel_error <= rtol
            report.checks.append(DerivativeCheck(k, i, tape, fd, abs_error, rel_error, ok))
    if raise_on_failure and not report.ok:
        raise GradCheckError(f"check_grads: derivatives disagree with finite differences\n{report}")
    return report
