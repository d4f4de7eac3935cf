"""Time minimaml's Omniglot conv4 meta-step (W2: second order; W2fo: first order) beside the peers of
the peer benchmark folder (``BENCH_PEERS``, by default ``../shared/bench`` beside the clone; the
workloads are in its ``WORKLOADS.md``): 32 tasks, 5-way 1-shot, 75 query images, one inner step
(alpha 0.4), every parameter adapted, on the peers' seeded inputs.

    BENCH_DATA=/tmp/bench-data python benchmarks/bench_w2.py [--repeats 10] [--rounds 2]
        [--workloads W2 W2fo] [--modes second_order] [--peers torch_loop,jax_loop]

The meta-step is ``minimaml.maml.meta_gradient`` of a ``Conv4`` configured like W2 (padding 1, batch
norm eps 1e-5 with scale and shift, no conv bias, flattened features). Prints one line per
(round, implementation): ``impl workload median_ms min_ms rel_err_f32 rel_err_f64``, where rel_err is
max over parameters of ||g - g_ref||_inf / ||g_ref||_inf against ``$BENCH_DATA/ref_<workload>.npz``
(float64; W2 agrees only to ~1e-3 in float32 for every implementation, see the peers' NOTES.md, so the
float64 column, ~1e-12, is the tight check). minimaml is timed in float32. Peers run in their own
processes (``peers.py``), alternating with minimaml in the same run; the last table gives each ratio
peer / minimaml (of medians, per round). On the GPU: ``MINIMAML_DEVICE=gpu`` for minimaml and
``BENCH_DEVICE=cuda`` for the PyTorch peers (``gpu_check.sh`` sets both). ``autograd`` is a peer too
but takes ~8 s a step, so it is left out unless named in ``--peers``. Numbers are printed, never
asserted.

The peers' arrays are NCHW images / OIHW filters with a flatten in (C, H, W) order; they are converted
once, outside the timed region, to minimaml's NHWC / HWIO (and the head's rows permuted to the (H, W, C)
flatten order), and the gradients are converted back before the comparison.

Memory allocator: a meta-step allocates and frees arrays of up to ~270 MB. glibc's malloc returns such
blocks to the OS (they are above its mmap threshold), so every step page-faults them in again. Unless
``MALLOC_MMAP_THRESHOLD_`` is already set, this script re-executes itself once with
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` raised (``--system-malloc`` keeps the defaults),
so freed blocks stay in the process and are reused. The peers' processes inherit the same environment.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy

from common import load_reference, load_workload, max_rel_diff, run_peer, summary, time_calls
from minimaml import autodiff as ad
from minimaml import backend, maml, parallel
from minimaml.nn.conv4 import Conv4

ALPHA = 0.4
LAYERS = 4
MODES = {"W2": ("second_order", "hvp"), "W2fo": ("first_order",)}
W2_NET = Conv4(image_size=28, in_channels=1, filters=64, stride=2, padding=1, features="flatten",
               bn_eps=1e-5, bn_scale=True, conv_bias=False)
TASK_LOSS = maml.supervised_loss(W2_NET.apply, ad.softmax_cross_entropy)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}


def head_rows(channels=64, size=2):
    """Row permutation: NHWC-flatten row r of the head reads NCHW-flatten row ``order[r]``."""
    return numpy.arange(channels * size * size).reshape(channels, size, size).transpose(1, 2, 0).ravel()


def workload_inputs(dtype):
    """The W2 parameters (minimaml names and layouts) and task batch, on the default device."""
    z = load_workload("W2")
    params = {}
    for i in range(LAYERS):
        params[f"conv{i}.w"] = z[f"c{i}"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
        params[f"conv{i}.bn.scale"] = z[f"g{i}"]
        params[f"conv{i}.bn.shift"] = z[f"be{i}"]
    params["head.w"] = z["wl"][head_rows()]
    params["head.b"] = z["bl"]
    params = {k: backend.asarray(numpy.ascontiguousarray(v), dtype=dtype) for k, v in params.items()}
    images = {k: backend.asarray(numpy.ascontiguousarray(z[k].transpose(0, 1, 3, 4, 2)), dtype=dtype)
              for k in ("xs", "xq")}
    tasks = maml.TaskBatch(maml.Examples(images["xs"], backend.asarray(z["ys"])),
                           maml.Examples(images["xq"], backend.asarray(z["yq"])))
    return params, tasks


def meta_step(params, tasks, mode):
    """d/dtheta sum_i L_Qi(theta - alpha grad L_Si(theta)), every parameter adapted, all tasks batched."""
    return maml.meta_gradient(TASK_LOSS, params, tasks, ALPHA, 1, mode=mode)


def in_peer_order(grads: dict) -> list:
    """Gradients in the peers' order and layouts (float64 host arrays)."""
    out = []
    for i in range(LAYERS):
        out.append(backend.to_numpy(grads[f"conv{i}.w"]).transpose(3, 2, 0, 1))
        out += [backend.to_numpy(grads[f"conv{i}.bn.scale"]), backend.to_numpy(grads[f"conv{i}.bn.shift"])]
    head = numpy.empty_like(backend.to_numpy(grads["head.w"]))
    head[head_rows()] = backend.to_numpy(grads["head.w"])
    out += [head, backend.to_numpy(grads["head.b"])]
    return [g.astype(numpy.float64) for g in out]


def reexec_with_malloc_settings() -> None:
    """Restart this script once with ``MALLOC_ENV`` set (see the module docstring)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "--system-malloc" in sys.argv:
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of minimaml and the peers")
    parser.add_argument("--workloads", nargs="+", default=["W2", "W2fo"], choices=list(MODES))
    parser.add_argument("--modes", nargs="+", default=["second_order", "first_order"],
                        choices=list(maml.MODES), help="minimaml modes to time (each runs on its workload)")
    parser.add_argument("--peers", default="torch_loop,jax_loop",
                        help="comma-separated peers.py implementations ('' for none; autograd is slow)")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc settings")
    args = parser.parse_args()
    reexec_with_malloc_settings()
    peers = [p for p in args.peers.split(",") if p]

    params32, tasks32 = workload_inputs(numpy.float32)
    params64, tasks64 = workload_inputs(numpy.float64)
    malloc = " ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in MALLOC_ENV)
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "(unset)")
    if backend.get_device() == "gpu":
        tf32 = os.environ.get("CUPY_TF32", "(unset: full float32 matrix products)")
        print(f"# minimaml on the GPU: CuPy {backend.xp().__version__}, CUPY_TF32={tf32}")
    else:
        print(f"# {malloc} OPENBLAS_NUM_THREADS={threads} minimaml threads={parallel.cpu_threads()} "
              "(its conv / batch-norm passes; BLAS held to one thread while it shares them out)")
    print("impl workload median_ms min_ms rel_err_f32 rel_err_f64")
    results = {}
    for round_ in range(args.rounds):
        for workload in args.workloads:
            reference = load_reference(workload)
            for mode in (m for m in MODES[workload] if m in args.modes):
                name = f"minimaml_{mode}"
                times = time_calls(lambda: meta_step(params32, tasks32, mode), args.repeats)
                med, best = summary(times)
                results.setdefault((name, workload), []).append(med)
                if round_ == 0:
                    err32 = max_rel_diff(in_peer_order(meta_step(params32, tasks32, mode)[1]), reference)
                    err64 = max_rel_diff(in_peer_order(meta_step(params64, tasks64, mode)[1]), reference)
                    errors = f"{err32:.1e} {err64:.1e}"
                else:
                    errors = "- -"
                print(f"{name} {workload} {med:.1f} {best:.1f} {errors}", flush=True)
            for peer in peers:
                timing = run_peer(peer, workload, args.repeats)
                if timing is not None:
                    results.setdefault((peer, workload), []).append(timing[0])
                    print(f"{peer} {workload} {timing[0]:.1f} {timing[1]:.1f}", flush=True)

    print("\nratio of medians (peer / minimaml; > 1 means minimaml is faster), per round:")
    for workload in args.workloads:
        ours = [results[(f"minimaml_{m}", workload)] for m in MODES[workload] if m in args.modes]
        if not ours:
            continue
        for peer in peers:
            if (peer, workload) in results:
                ratios = [p / m for p, m in zip(results[(peer, workload)], ours[0])]
                print(f"  {workload} {peer:12s} " + " ".join(f"{r:6.2f}" for r in ratios))


if __name__ == "__main__":
    main()
