"""The tape's own cost: per recorded operation on small arrays, and an MLP forward+backward beside
the same computation hand-written in plain NumPy (no tape).

    python benchmarks/bench_tape.py [--repeats 2000]

1. Per operation: the time of one tape operation on (10, 40) float32 arrays (recorded, i.e. with an
   input that requires a gradient) minus the time of the bare NumPy expression: the bookkeeping cost.
2. MLP 1-40-40-1 (ReLU), batch of 10, MSE: forward + backward to all six parameter arrays with
   ``ad.grad``, and the same gradients written out by hand in NumPy; the ratio tape / NumPy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy

from minimaml import autodiff as ad
from minimaml.nn import mlp


def per_call_us(fn, repeats: int) -> float:
    for _ in range(repeats // 10):
        fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats * 1e6)
    return min(times)


def numpy_mlp_grads(params, x, y):
    """Forward and hand-written backward of relu MLP + mean squared error, in plain NumPy."""
    w0, b0, w1, b1, w2, b2 = (params[f"layer{i}.{k}"] for i in range(3) for k in "wb")
    z0 = x @ w0 + b0
    h0 = numpy.maximum(z0, 0)
    z1 = h0 @ w1 + b1
    h1 = numpy.maximum(z1, 0)
    out = h1 @ w2 + b2
    diff = out - y
    loss = numpy.mean(diff * diff)
    g_out = 2 * diff / diff.size
    g_h1 = g_out @ w2.T
    g_z1 = g_h1 * (z1 > 0)
    g_h0 = g_z1 @ w1.T
    g_z0 = g_h0 * (z0 > 0)
    return loss, [x.T @ g_z0, g_z0.sum(0), h0.T @ g_z1, g_z1.sum(0), h1.T @ g_out, g_out.sum(0)]


def tape_mlp_grads(params, x, y):
    leaves = [ad.Tensor(p, requires_grad=True) for p in params.values()]
    loss = ad.mean(ad.mse(mlp.apply(dict(zip(params, leaves)), x), y))
    return loss, ad.grad(loss, leaves)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    rng = numpy.random.default_rng(0)
    a_np = rng.standard_normal((10, 40)).astype(numpy.float32)
    b_np = rng.standard_normal((10, 40)).astype(numpy.float32)
    w_np = rng.standard_normal((40, 40)).astype(numpy.float32)
    a, b, w = ad.Tensor(a_np, requires_grad=True), ad.Tensor(b_np), ad.Tensor(w_np)
    operations = [
        ("add", lambda: a + b, lambda: a_np + b_np),
        ("multiply", lambda: a * b, lambda: a_np * b_np),
        ("exp", lambda: ad.exp(a), lambda: numpy.exp(a_np)),
        ("relu", lambda: ad.relu(a), lambda: a_np * (a_np > 0).astype(numpy.float32)),
        ("sum (axis 0)", lambda: ad.sum(a, axis=0), lambda: a_np.sum(axis=0)),
        ("reshape", lambda: ad.reshape(a, (40, 10)), lambda: a_np.reshape(40, 10)),
        ("matmul", lambda: a @ w, lambda: a_np @ w_np),
    ]
    print("operation on (10, 40) float32   tape us   numpy us   overhead us")
    overheads = []
    for name, tape_fn, numpy_fn in operations:
        tape_us, numpy_us = per_call_us(tape_fn, args.repeats), per_call_us(numpy_fn, args.repeats)
        overheads.append(tape_us - numpy_us)
        print(f"{name:30s} {tape_us:9.2f} {numpy_us:10.2f} {tape_us - numpy_us:13.2f}")
    print(f"median overhead per recorded operation: {statistics.median(overheads):.2f} us")

    params = mlp.init(rng, scheme="uniform")
    x = rng.uniform(-5, 5, (10, 1)).astype(numpy.float32)
    y = numpy.sin(x)
    tape_loss, tape_grads = tape_mlp_grads(params, x, y)
    numpy_loss, numpy_grads = numpy_mlp_grads(params, x, y)
    worst = max(float(numpy.max(numpy.abs(t.data - n))) / float(numpy.max(numpy.abs(n)))
                for t, n in zip(tape_grads, numpy_grads))
    tape_us = per_call_us(lambda: tape_mlp_grads(params, x, y), args.repeats // 4)
    numpy_us = per_call_us(lambda: numpy_mlp_grads(params, x, y), args.repeats // 4)
    print(f"\nMLP 1-40-40-1, batch 10, forward + backward: tape {tape_us:.1f} us, plain NumPy "
          f"{numpy_us:.1f} us, ratio {tape_us / numpy_us:.2f} (gradients agree to {worst:.1e})")


if __name__ == "__main__":
    main()
