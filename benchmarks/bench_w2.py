"""W2 / W2fo meta-step timings (``/work/shared/bench/WORKLOADS.md``): the Omniglot conv4 meta-gradient of
32 tasks, 5-way 1-shot, 75 query images, one inner step (alpha 0.4), on the peers' seeded inputs.

    BENCH_DATA=/tmp/bench-data python benchmarks/bench_w2.py [--repeats 10] [--workloads W2 W2fo]

Prints ``minimaml <workload> <dtype> median_ms min_ms rel_err`` per line, where rel_err is
max over parameters of ||g - g_ref||_inf / ||g_ref||_inf against ``$BENCH_DATA/ref_<workload>.npz``
(float64). Numbers are printed, never asserted.

The peers' arrays are NCHW images / OIHW filters with a flatten in (C, H, W) order; they are converted
once, outside the timed region, to minimaml's NHWC / HWIO (and the head's rows permuted to the (H, W, C)
flatten order), and the gradients are converted back before the comparison.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy

from minimaml import autodiff as ad
from minimaml import backend
from minimaml.nn.conv4 import Conv4

ALPHA = 0.4
LAYERS = 4
W2_NET = Conv4(image_size=28, in_channels=1, filters=64, stride=2, padding=1, features="flatten",
               bn_eps=1e-5, bn_scale=True, conv_bias=False)


def head_rows(channels=64, size=2):
    """Row permutation: NHWC-flatten row r of the head reads NCHW-flatten row ``order[r]``."""
    return numpy.arange(channels * size * size).reshape(channels, size, size).transpose(1, 2, 0).ravel()


def load(data_dir: str, dtype):
    """The W2 parameters (minimaml names and layouts) and task batch, on the default device."""
    z = numpy.load(os.path.join(data_dir, "W2.npz"))
    params = {}
    for i in range(LAYERS):
        params[f"conv{i}.w"] = z[f"c{i}"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
        params[f"conv{i}.bn.scale"] = z[f"g{i}"]
        params[f"conv{i}.bn.shift"] = z[f"be{i}"]
    params["head.w"] = z["wl"][head_rows()]
    params["head.b"] = z["bl"]
    params = {k: backend.asarray(numpy.ascontiguousarray(v), dtype=dtype) for k, v in params.items()}
    batch = {k: backend.asarray(numpy.ascontiguousarray(z[k].transpose(0, 1, 3, 4, 2)), dtype=dtype)
             for k in ("xs", "xq")}
    batch.update({k: backend.asarray(z[k]) for k in ("ys", "yq")})
    return params, batch


def to_reference_layout(grads: dict) -> list:
    """Gradients in the peers' order and layouts (float64 host arrays)."""
    out = []
    for i in range(LAYERS):
        out.append(backend.to_numpy(grads[f"conv{i}.w"]).transpose(3, 2, 0, 1))
        out += [backend.to_numpy(grads[f"conv{i}.bn.scale"]), backend.to_numpy(grads[f"conv{i}.bn.shift"])]
    head = numpy.empty_like(backend.to_numpy(grads["head.w"]))
    head[head_rows()] = backend.to_numpy(grads["head.w"])
    out += [head, backend.to_numpy(grads["head.b"])]
    return [g.astype(numpy.float64) for g in out]


def meta_gradient(params: dict, batch: dict, first_order: bool) -> dict:
    """d/dtheta sum_i L_Qi(theta - alpha grad L_Si(theta)), every parameter adapted, all tasks batched.

    theta_i = broadcast_to(theta, (T, ...)) gives each task its own copy, so grad(sum_i L_Si, theta_i)
    is the per-task inner gradient; ``create_graph`` (second order) keeps it differentiable.
    """
    tasks = batch["xs"].shape[0]
    names = list(params)
    theta = [ad.Tensor(params[k], requires_grad=True) for k in names]
    theta_i = [ad.broadcast_to(p, (tasks, *p.shape)) for p in theta]
    support = ad.sum(ad.softmax_cross_entropy(W2_NET.apply(dict(zip(names, theta_i)), batch["xs"]), batch["ys"]))
    inner = ad.grad(support, theta_i, create_graph=not first_order)
    adapted = {k: p - ALPHA * g for k, p, g in zip(names, theta_i, inner)}
    query = ad.sum(ad.softmax_cross_entropy(W2_NET.apply(adapted, batch["xq"]), batch["yq"]))
    return {k: g.data for k, g in zip(names, ad.grad(query, theta))}


def max_rel_err(grads: list, ref: list) -> float:
    return max(float(numpy.max(numpy.abs(g - r)) / numpy.max(numpy.abs(r))) for g, r in zip(grads, ref))


def bench(workload: str, dtype, data_dir: str, repeats: int) -> None:
    params, batch = load(data_dir, dtype)
    first_order = workload == "W2fo"
    grads = meta_gradient(params, batch, first_order)  # warm-up (first-touch allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        grads = meta_gradient(params, batch, first_order)
        times.append(1e3 * (time.perf_counter() - start))
    z = numpy.load(os.path.join(data_dir, f"ref_{workload}.npz"))
    ref = [z[f"arr_{i}"] for i in range(len(z.files))]
    err = max_rel_err(to_reference_layout(grads), ref)
    print(f"minimaml {workload} {numpy.dtype(dtype).name} {numpy.median(times):.1f} {min(times):.1f} {err:.2e}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workloads", nargs="+", default=["W2", "W2fo"], choices=["W2", "W2fo"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--data", default=os.environ.get("BENCH_DATA", "/tmp/bench-data"))
    args = parser.parse_args()
    print("impl workload dtype median_ms min_ms rel_err")
    for workload in args.workloads:
        for dtype in args.dtypes:
            bench(workload, numpy.dtype(dtype), args.data, args.repeats)


if __name__ == "__main__":
    main()
