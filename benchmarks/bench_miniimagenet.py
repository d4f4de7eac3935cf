"""Time and memory of one MiniImagenet meta-step at the paper's settings, on random images.

    python benchmarks/bench_miniimagenet.py [--shots 1 5] [--modes first_order second_order]
        [--repeats 3] [--blas-threads 1] [--system-malloc]

The step is ``maml.meta_gradient`` of ``miniimagenet_conv4`` (4 x [3x3 conv, 32 filters, batch norm,
ReLU, 2x2 max-pool], 84x84x3 images): 5-way, 15 query images per class, 5 inner steps of alpha 0.01,
meta-batch 4 (1-shot) or 2 (5-shot), as ``minimaml.experiments.miniimagenet.config`` sets them. Prints,
per (shot, mode), the median and min seconds over ``--repeats`` steps after one warm-up, and the peak
memory of one step as ``tracemalloc`` sees it (NumPy reports its arrays there). No peer in the peer
benchmark folder (``BENCH_PEERS``, by default ``../shared/bench`` beside the clone) has this workload,
so there are no ratios; it tells how long the MiniImagenet training runs take and tracks the conv /
batch-norm primitives over time. Numbers are printed, never asserted. BLAS is single-threaded by
default, and freed arrays are kept for reuse (``minimaml.allocator``), as in the training runs;
``--system-malloc`` leaves glibc's defaults.
"""

from __future__ import annotations

import argparse
import os


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--modes", nargs="+", default=["first_order", "second_order"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc settings alone")
    return parser.parse_args(argv)


ARGS = parse_args()
for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = str(ARGS.blas_threads)

import tracemalloc  # noqa: E402

import numpy  # noqa: E402

from common import summary, time_calls  # noqa: E402
from minimaml import autodiff as ad  # noqa: E402
from minimaml import allocator, maml  # noqa: E402
from minimaml.experiments import miniimagenet  # noqa: E402
from minimaml.nn.conv4 import miniimagenet_conv4  # noqa: E402


def random_tasks(rng, n_tasks: int, k_shot: int, q_query: int, n_way: int = 5) -> maml.TaskBatch:
    """A meta-batch of random 84x84x3 float32 images in [0, 1) with balanced labels."""
    support_x = rng.random((n_tasks, n_way * k_shot, 84, 84, 3), dtype=numpy.float32)
    query_x = rng.random((n_tasks, n_way * q_query, 84, 84, 3), dtype=numpy.float32)
    support_y = numpy.tile(numpy.repeat(numpy.arange(n_way), k_shot), (n_tasks, 1))
    query_y = numpy.tile(numpy.repeat(numpy.arange(n_way), q_query), (n_tasks, 1))
    return maml.TaskBatch(maml.Examples(support_x, support_y), maml.Examples(query_x, query_y))


def main() -> None:
    rng = numpy.random.default_rng(0)
    net = miniimagenet_conv4()
    params = net.init(rng, 5, numpy.float32)
    task_loss = maml.supervised_loss(net.apply, ad.softmax_cross_entropy)
    kept = not ARGS.system_malloc and allocator.keep_freed_memory()
    print(f"# OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}, freed arrays kept for reuse: {kept}")
    print("shot mode meta_batch inner_steps median_s min_s peak_MB")
    for k_shot in ARGS.shots:
        cfg = miniimagenet.config(k_shot, "first_order", "full")
        tasks = random_tasks(rng, cfg.meta_batch_size, k_shot, cfg.q_train)
        for mode in ARGS.modes:
            def step():
                return maml.meta_gradient(task_loss, params, tasks, cfg.inner_lr, cfg.inner_steps, mode=mode)

            med, best = summary(time_calls(step, ARGS.repeats, warmup=1))
            tracemalloc.start()
            step()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(f"{k_shot} {mode} {cfg.meta_batch_size} {cfg.inner_steps} {med / 1e3:.2f} {best / 1e3:.2f} "
                  f"{peak / 2**20:.0f}", flush=True)


if __name__ == "__main__":
    main()
