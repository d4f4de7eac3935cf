"""The derivative verification report: every primitive of the tape checked at first and second order
against finite differences (``check_grads``) on fixed random float64 inputs.

    python -m minimaml.verify          # prints a table; exit status 1 if any check fails
"""

from __future__ import annotations

import sys

import numpy

from . import autodiff as ad


def _cases(rng) -> list:
    """(name, function, inputs): inputs are float64 arrays kept away from kinks and ties."""
    def normal(*shape):
        return rng.standard_normal(shape)

    def positive(*shape):
        return rng.uniform(0.5, 2.0, shape)

    def away_from_zero(*shape):
        return rng.uniform(0.2, 1.5, shape) * rng.choice([-1.0, 1.0], shape)

    def distinct(*shape):  # entries far from one another: max and max-pool have no ties
        return rng.permutation(numpy.arange(numpy.prod(shape), dtype=float)).reshape(shape) * 0.1

    labels = rng.integers(0, 4, (2, 3))
    mask = rng.random((3, 4)) > 0.5
    return [
        ("add (broadcast)", lambda a, b: a + b, [normal(2, 3, 4), normal(3, 1)]),
        ("subtract (broadcast)", lambda a, b: a - b, [normal(3, 4), normal(4)]),
        ("multiply (broadcast)", lambda a, b: a * b, [normal(2, 1, 4), normal(3, 4)]),
        ("divide", lambda a, b: a / b, [normal(3, 4), positive(3, 4)]),
        ("negative", lambda a: -a, [normal(3, 4)]),
        ("power (constant)", lambda a: a ** 3, [normal(3, 4)]),
        ("power (tensor)", lambda a, b: ad.power(a, b), [positive(3, 4), normal(3, 4)]),
        ("exp", ad.exp, [normal(3, 4)]),
        ("log", ad.log, [positive(3, 4)]),
        ("sqrt", ad.sqrt, [positive(3, 4)]),
        ("tanh", ad.tanh, [normal(3, 4)]),
        ("sigmoid", ad.sigmoid, [normal(3, 4)]),
        ("relu", ad.relu, [away_from_zero(3, 4)]),
        ("abs", ad.abs, [away_from_zero(3, 4)]),
        ("where (constant mask)", lambda a, b: ad.where(mask, a, b), [normal(3, 4), normal(4)]),
        ("maximum", ad.maximum, [distinct(3, 4), distinct(3, 4) + 0.05]),
        ("sum (axis, keepdims)", lambda a: ad.sum(a * a, axis=1, keepdims=True), [normal(2, 3, 4)]),
        ("mean (axes)", lambda a: ad.mean(a * a, axis=(0, 2)), [normal(2, 3, 4)]),
        ("max (axis)", lambda a: ad.max(a * a, axis=-1), [distinct(2, 3, 4) + 1.0]),
        ("broadcast_to", lambda a: ad.broadcast_to(a, (2, 3, 4)) ** 2, [normal(3, 1)]),
        ("reshape", lambda a: ad.reshape(a, (4, 6)) ** 2, [normal(2, 3, 4)]),
        ("transpose", lambda a: ad.transpose(a, (2, 0, 1)) ** 2, [normal(2, 3, 4)]),
        ("getitem (slices)", lambda a: a[:, 1:, ::2] ** 2, [normal(2, 3, 4)]),
        ("getitem (repeated ints)", lambda a: a[numpy.array([0, 2, 2, 1])] ** 2, [normal(3, 4)]),
        ("scatter_add", lambda a: ad.scatter_add(a, numpy.array([0, 2, 2]), (4, 2)) ** 2, [normal(3, 2)]),
        ("concatenate", lambda a, b: ad.concatenate([a, b], axis=1) ** 2, [normal(2, 3), normal(2, 2)]),
        ("stack", lambda a, b: ad.stack([a, b], axis=-1) ** 2, [normal(2, 3), normal(2, 3)]),
        ("matmul (batch broadcast)", ad.matmul, [normal(2, 3, 4), normal(4, 5)]),
        ("matmul (task axis)", lambda a, b: ad.tanh(ad.matmul(a, b)), [normal(3, 2, 4), normal(3, 4, 2)]),
        ("im2col", lambda x: ad.im2col(x, 3, 3, 2, ((1, 1), (0, 1))) ** 2, [normal(2, 5, 5, 2)]),
        ("col2im", lambda c: ad.col2im(c, (2, 5, 5, 2), 3, 3, 2, ((1, 1), (0, 1))) ** 2,
         [normal(2, 3, 2, 18)]),
        ("conv2d (stride 2, SAME)", lambda x, w: ad.tanh(ad.conv2d(x, w, stride=2)),
         [normal(2, 6, 6, 2), normal(3, 3, 2, 3)]),
        ("conv2d (task axis)", lambda x, w: ad.tanh(ad.conv2d(x, w, stride=1, padding=1)),
         [normal(2, 3, 5, 5, 2), normal(2, 3, 3, 2, 3)]),
        ("batch_normalize (+ ReLU)", lambda x, s: ad.batch_normalize(x * x, s, eps=1e-3, relu=True) * x,
         [normal(2, 6, 3), normal(2, 1, 3)]),
        ("max_pool2x2 (odd size)", lambda x: ad.max_pool2x2(x * x), [distinct(2, 5, 5, 2) + 1.0]),
        ("logsumexp", lambda a: ad.logsumexp(a, axis=-1), [normal(3, 5)]),
        ("log_softmax", ad.log_softmax, [normal(3, 5)]),
        ("mse", ad.mse, [normal(2, 4, 3), normal(2, 4, 3)]),
        ("softmax_cross_entropy", lambda z: ad.softmax_cross_entropy(z, labels), [normal(2, 3, 4)]),
    ]


def report(order: int = 2, seed: int = 0, file=sys.stdout) -> bool:
    """Check every case at orders 1..``order``; print a table; return True when all pass."""
    rng = numpy.random.default_rng(seed)
    all_ok = True
    header = f"{'primitive':28s}" + "".join(f" {'order ' + str(k):>12s}" for k in range(1, order + 1))
    print(header + "  result", file=file)
    for name, fn, inputs in _cases(rng):
        result = ad.check_grads(fn, inputs, order=order, raise_on_failure=False)
        all_ok &= result.ok
        errors = "".join(f" {result.max_rel_error(k):12.2e}" for k in range(1, order + 1))
        print(f"{name:28s}{errors}  {'ok' if result.ok else 'FAIL'}", file=file)
    print(f"max relative error between the tape's directional derivatives and 5-point central "
          f"differences (float64); {'all passed' if all_ok else 'FAILURES'}", file=file)
    return all_ok


def main() -> int:
    return 0 if report() else 1


if __name__ == "__main__":
    sys.exit(main())
