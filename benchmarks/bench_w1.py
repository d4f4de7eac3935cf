"""Time minimaml's sinusoid meta-step (W1: 1 inner step; W1b: 5) beside the peers of the peer benchmark
folder (``BENCH_PEERS``, by default ``../shared/bench`` beside the clone).

    python benchmarks/bench_w1.py [--repeats 50] [--rounds 3] [--peers jax,torch_func,torch_loop]

Prints one line per (round, implementation): ``impl workload median_ms min_ms rel_err``, where
rel_err is the max relative difference from the float64 reference; minimaml runs in every mode, in
float32 (timed) and float64 (checked to ~1e-12). Peers run in their own processes, alternating with
minimaml in the same run, and the last table gives each ratio peer / minimaml (of medians).
Also prints the peak memory (tracemalloc) of each mode as the number of inner steps grows.

Memory allocator: as the sinusoid experiment does, this script first makes glibc's malloc keep freed
blocks (``allocator.keep_freed_memory``); otherwise the step's 160 KB arrays go back to the kernel and
are page-faulted in again on every step. The peers run in their own processes, with their own settings.
"""

from __future__ import annotations

import argparse
import tracemalloc

import numpy

from common import load_reference, load_workload, max_rel_diff, run_peer, summary, time_calls
from minimaml import allocator, maml
from minimaml import autodiff as ad
from minimaml.nn import mlp

PEER_ORDER = ["w0", "b0", "w1", "b1", "w2", "b2"]
INNER_STEPS = {"W1": 1, "W1b": 5}
ALPHA = 0.01
TASK_LOSS = maml.supervised_loss(mlp.apply, ad.mse)


def workload_inputs(dtype):
    """W1's parameters renamed to minimaml's MLP names, and its tasks."""
    z = load_workload("W1")
    params = {f"layer{i}.{kind}": z[f"{kind}{i}"].astype(dtype) for i in range(3) for kind in "wb"}
    tasks = maml.TaskBatch(maml.Examples(z["xs"].astype(dtype), z["ys"].astype(dtype)),
                           maml.Examples(z["xq"].astype(dtype), z["yq"].astype(dtype)))
    return params, tasks


def meta_step(params, tasks, workload, mode):
    return maml.meta_gradient(TASK_LOSS, params, tasks, ALPHA, INNER_STEPS[workload], mode=mode)


def in_peer_order(grads):
    return [grads[f"layer{name[1]}.{name[0]}"] for name in PEER_ORDER]


def peak_memory_kib(params, tasks, steps, mode) -> float:
    tracemalloc.start()
    maml.meta_gradient(TASK_LOSS, params, tasks, ALPHA, steps, mode=mode)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of minimaml and the peers")
    parser.add_argument("--peers", default="jax,torch_func,torch_loop,autograd",
                        help="comma-separated peers.py implementations ('' for none)")
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    print(f"# malloc keeps freed blocks (allocator.keep_freed_memory): {allocator.keep_freed_memory()}")

    params32, tasks32 = workload_inputs(numpy.float32)
    params64, tasks64 = workload_inputs(numpy.float64)
    results = {}
    print("impl workload median_ms min_ms rel_err_f32 rel_err_f64")
    for round_ in range(args.rounds):
        for workload in INNER_STEPS:
            reference = load_reference(workload)
            for mode in maml.MODES:
                name = f"minimaml_{mode}"
                times = time_calls(lambda: meta_step(params32, tasks32, workload, mode), args.repeats)
                med, best = summary(times)
                results.setdefault((name, workload), []).append(med)
                if mode == "first_order":  # a different gradient: the reference is second-order
                    errors = "- -"
                else:
                    err32 = max_rel_diff(in_peer_order(meta_step(params32, tasks32, workload, mode)[1]), reference)
                    err64 = max_rel_diff(in_peer_order(meta_step(params64, tasks64, workload, mode)[1]), reference)
                    errors = f"{err32:.1e} {err64:.1e}"
                print(f"{name} {workload} {med:.3f} {best:.3f} {errors}", flush=True)
            for peer in peers:
                timing = run_peer(peer, workload, args.repeats)
                if timing is not None:
                    results.setdefault((peer, workload), []).append(timing[0])
                    print(f"{peer} {workload} {timing[0]:.3f} {timing[1]:.3f}", flush=True)

    print("\nratio of medians (peer / minimaml second_order; > 1 means minimaml is faster), per round:")
    for workload in INNER_STEPS:
        ours = results[("minimaml_second_order", workload)]
        for peer in peers:
            if (peer, workload) in results:
                ratios = [p / m for p, m in zip(results[(peer, workload)], ours)]
                print(f"  {workload} {peer:12s} " + " ".join(f"{r:6.2f}" for r in ratios))

    print("\npeak memory of one meta-step (tracemalloc, KiB) against inner steps:")
    print("mode          " + " ".join(f"{k:>8d}" for k in (1, 5, 10, 20)))
    for mode in maml.MODES:
        row = [peak_memory_kib(params32, tasks32, k, mode) for k in (1, 5, 10, 20)]
        print(f"{mode:13s} " + " ".join(f"{m:8.0f}" for m in row))


if __name__ == "__main__":
    main()
