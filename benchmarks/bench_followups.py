"""One meta-step of each follow-up beside MAML's, and iMAML's memory against the number of inner steps.

    python benchmarks/bench_followups.py [--repeats 5] [--skip-w2]

Workloads, on random seeded inputs (float32): W1, the sinusoid MLP 1-40-40-1, 25 tasks, K = 10 support
+ 10 query points; W2, the Omniglot conv net (``conv4.omniglot_conv4``), 32 tasks, 5-way 1-shot, 75
query images. Each algorithm with the inner steps it trains with here (MAML, ANIL, Meta-SGD: 1;
Reptile: 5 on support + query; MAML++: 5; iMAML: 16 and 5 CG steps). Prints the median and min
milliseconds per meta-step after warm-up, then the peak memory of one meta-step (tracemalloc, KiB) of
iMAML and of MAML (second order) on W1 against the inner steps. BLAS single-threaded. Printed, never
asserted.
"""

from __future__ import annotations

import argparse
import os

for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import tracemalloc  # noqa: E402

import numpy  # noqa: E402

from common import summary, time_calls  # noqa: E402
from minimaml import autodiff as ad  # noqa: E402
from minimaml import maml  # noqa: E402
from minimaml.algorithms import ANIL, IMAML, MAML, MAMLPlusPlus, MetaSGD, Reptile  # noqa: E402
from minimaml.nn import conv4, mlp  # noqa: E402


def w1(rng):
    tasks = maml.TaskBatch(*[maml.Examples(rng.uniform(-5, 5, (25, 10, 1)).astype(numpy.float32),
                                           rng.standard_normal((25, 10, 1)).astype(numpy.float32))
                             for _ in range(2)])
    return maml.supervised_loss(mlp.apply, ad.mse), mlp.init(rng, scheme="uniform"), tasks, 0.01


def w2(rng):
    net = conv4.omniglot_conv4()
    labels = numpy.tile(numpy.arange(5), (32, 1))
    tasks = maml.TaskBatch(maml.Examples(rng.random((32, 5, 28, 28, 1), dtype=numpy.float32), labels),
                           maml.Examples(rng.random((32, 75, 28, 28, 1), dtype=numpy.float32),
                                         numpy.repeat(labels, 15, axis=1)))
    return maml.supervised_loss(net.apply, ad.softmax_cross_entropy), net.init(rng, 5), tasks, 0.4


def algorithms(inner_lr):
    return {"maml": MAML(inner_lr, 1), "anil": ANIL(inner_lr, 1), "meta_sgd": MetaSGD((0.005, 0.1), 1),
            "reptile": Reptile(inner_lr, 5, optimizer="sgd"), "maml_pp": MAMLPlusPlus(inner_lr, 5, per_step_bn=True),
            "imaml": IMAML(inner_lr, 16, lam=2.0, cg_steps=5)}


def peak_kib(fn) -> float:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-w2", action="store_true")
    args = parser.parse_args()
    rng = numpy.random.default_rng(0)
    print(f"{'workload':8s} {'algorithm':10s} {'median ms':>10s} {'min ms':>10s} {'x MAML':>7s}")
    for name, workload in (("W1", w1), ("W2", w2)):
        if name == "W2" and args.skip_w2:
            continue
        loss, params, tasks, inner_lr = workload(rng)
        maml_ms = None
        for algo_name, algorithm in algorithms(inner_lr).items():
            meta = algorithm.init(params, numpy.random.default_rng(1))
            times = time_calls(lambda: algorithm.meta_gradient(loss, meta, tasks, 0), args.repeats, warmup=1)
            median, least = summary(times)
            maml_ms = median if maml_ms is None else maml_ms
            print(f"{name:8s} {algo_name:10s} {median:10.1f} {least:10.1f} {median / maml_ms:7.2f}")
    loss, params, tasks, _ = w1(rng)
    steps = (1, 5, 10, 20, 40)
    print("\npeak memory of one meta-step on W1 (KiB) against the inner steps: " + " ".join(f"{k:>7d}" for k in steps))
    makers = (("MAML second_order", lambda k: MAML(0.01, k)), ("iMAML (5 CG steps)", lambda k: IMAML(0.01, k, lam=2.0, cg_steps=5)))
    for label, make in makers:
        row = [peak_kib(lambda: make(k).meta_gradient(loss, params, tasks, 0)) for k in steps]
        print(f"{label:66s} " + " ".join(f"{v:7.0f}" for v in row))


if __name__ == "__main__":
    main()
