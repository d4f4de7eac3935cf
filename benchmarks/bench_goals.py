"""Every speed goal of the project's speed issue as a ratio, from one command: minimaml beside its peers
(and, with ``--baseline``, beside an earlier checkout of itself), alternating in one run.

    BENCH_DATA=/tmp/bench-data BENCH_PYTHON=<peers' python> python benchmarks/bench_goals.py
        [--rounds 2] [--baseline DIR] [--only W1 W1b W2 W2fo RL] [--w1-repeats 50] [--w2-repeats 5]
        [--rl-iterations 2]

Goals (ratio = other / minimaml, > 1 means minimaml is faster; the median over rounds of the ratio of
medians is compared; the ratio of the fastest calls is printed beside it, steadier on a busy machine):

- W2 (second order) and W2fo (first order), Omniglot Conv4, 32 tasks: ``torch_loop`` / minimaml >= 1.5;
- W1 and W1b (sinusoid, 1 and 5 inner steps, second order): ``jax`` (jit + vmap) / minimaml >= 0.5,
  and ``torch_func`` / minimaml > 1;
- RL: one navigation MAML-TRPO iteration (quick settings, 20 tasks x 20 trajectories, seeded):
  baseline / minimaml >= 2, with ``--baseline`` only; the script also says whether the new
  parameters of both are bit-identical (a hash of their bytes);
- memory: the peak traced memory (``tracemalloc``, which sees NumPy's arrays) of one W2 step and of one
  RL iteration, this tree against the baseline: not worse.

The header also prints the machine's float32 GEMM rate (two 2000 x 2000 matrices, NumPy's BLAS, at the
run's threads), so that a reader can judge the times against the machine.

``python run_all.py``'s quick wall time (goal: 10 minutes on 2 quiet cores) takes too long to sit in a
round; time it by itself (``time python run_all.py``).

Every measurement runs in a subprocess of its own (``--measure``), minimaml's from this checkout or from
``--baseline DIR`` (a checkout of an earlier commit, e.g. ``git worktree add /tmp/base main``), the
peers' from the peer benchmark folder (``benchmarks/common.py``: ``BENCH_PEERS``, ``BENCH_PYTHON``),
one after the other within each round (this tree and the baseline take turns going first), so that a
busy machine slows all of them alike. ``--threads N``
sets ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``MINIMAML_THREADS`` for
every process, peers included (on a machine shared with other jobs, ``--threads 1``: with their
default threads the PyTorch peers thrash under load, see docs/results.md). Each line
printed: ``who workload median_ms min_ms [peak_MiB] [hash]``. BLAS runs single-threaded in the RL
measurement (``bench_rl.py``). W2 and RL get ``bench_w2.py``'s malloc settings, and W1 the same
(the sinusoid experiment's meta-steps run with them: ``allocator.keep_freed_memory``; without them
glibc hands W1's 160 KB weight gradients back to the kernel and page-faults them in again every step,
~0.7 ms of a ~1.8 ms step on a 2-core machine); W1's peers get them too (they make no difference to
them). Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = ("W1", "W1b", "W2", "W2fo", "RL")
PEER_GOALS = {"W1": (("jax", 0.5), ("torch_func", 1.0)), "W1b": (("jax", 0.5), ("torch_func", 1.0)),
              "W2": (("torch_loop", 1.5),), "W2fo": (("torch_loop", 1.5),)}
BASELINE_GOALS = {"RL": 2.0}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}
ONE_BLAS_THREAD = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


# --- one measurement, in its own process (``--measure``) ---------------------------------------------


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()[:12]


def _peak_mib(fn) -> float:
    import tracemalloc
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def gemm_rate() -> None:
    """Print the machine's float32 GEMM rate in GFLOP/s (``common.square_gemm_gflops``)."""
    from common import square_gemm_gflops
    print(f"{square_gemm_gflops():.1f}")


def measure(workload: str, repeats: int) -> None:
    """Print ``median_ms min_ms peak_MiB hash`` of ``repeats`` timed calls of ``workload``'s step."""
    import numpy

    from common import summary, time_calls
    if workload in ("W1", "W1b"):
        from bench_w1 import meta_step, workload_inputs
        params, tasks = workload_inputs(numpy.float32)

        def step():
            return meta_step(params, tasks, workload, "second_order")
        peak = _peak_mib(step)
    elif workload in ("W2", "W2fo"):
        from bench_w2 import meta_step, workload_inputs
        params, tasks = workload_inputs(numpy.float32)
        mode = "second_order" if workload == "W2" else "first_order"

        def step():
            return meta_step(params, tasks, mode)
        peak = _peak_mib(step)
    else:
        from minimaml.experiments import navigation
        from minimaml.experiments.rl_common import build_env, init_policy
        from minimaml.rl import maml_rl
        cfg = navigation.config("quick")
        env = build_env(cfg)
        params = init_policy(env, seed=0)

        # the inner step: an algorithm from algorithms.make (a bare alpha in checkouts before it existed)
        inner = cfg.inner_lr
        if "algorithm" in inspect.signature(maml_rl.meta_iteration).parameters:
            from minimaml import algorithms
            inner = algorithms.make("maml", cfg.inner_lr, 1)

        def step():  # the same seed every call: the same iteration, so its result can be compared
            return maml_rl.meta_iteration(env, params, numpy.random.default_rng(26), cfg.trpo(),
                                          cfg.meta_batch_size, cfg.n_traj, inner, cfg.discount, cfg.gae_lambda)
        peak = _peak_mib(step)
    result = step()[1 if workload != "RL" else 0]
    digest = _digest([numpy.asarray(result[k]) for k in sorted(result)])
    times = time_calls(step, repeats, warmup=0 if workload in ("W2", "W2fo", "RL") else 2)
    median, best = summary(times)
    print(f"{median:.3f} {best:.3f} {peak:.1f} {digest}")


# --- the rounds ---------------------------------------------------------------------------------------


def _malloc_env() -> dict:
    """``MALLOC_ENV``, less what the environment already sets (the user's choice wins)."""
    return {k: v for k, v in MALLOC_ENV.items() if k not in os.environ}


def run_minimaml(tree: str, workload: str, repeats: int):
    """(median_ms, min_ms, peak_MiB, hash) of ``workload`` on the minimaml of checkout ``tree``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, HERE]))
    if workload in ("W1", "W1b", "W2", "W2fo", "RL"):  # freed memory kept for reuse, as the training commands do
        env.update(_malloc_env())
    if workload == "RL":
        env.update(ONE_BLAS_THREAD)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", workload, "--repeats",
                          str(repeats)], capture_output=True, text=True, env=env, cwd=tree)
    if out.returncode != 0:
        raise RuntimeError(f"bench_goals: measuring {workload} in {tree} failed:\n{out.stderr.strip()}")
    median, best, peak, digest = out.stdout.split()[-4:]
    return float(median), float(best), float(peak), digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", help="a checkout of an earlier minimaml to time beside this one")
    parser.add_argument("--only", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--w1-repeats", type=int, default=50)
    parser.add_argument("--w2-repeats", type=int, default=5)
    parser.add_argument("--rl-iterations", type=int, default=2)
    parser.add_argument("--threads", type=int, help="threads of BLAS, OpenMP and minimaml in every process")
    parser.add_argument("--measure", choices=(*WORKLOADS, "GEMM"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure == "GEMM":
        return gemm_rate()
    if args.measure:
        return measure(args.measure, args.repeats)

    if args.threads is not None:
        os.environ.update({name: str(args.threads) for name in (*ONE_BLAS_THREAD, "MINIMAML_THREADS")})
    from common import run_peer
    this_tree = os.path.dirname(HERE)
    trees = {"minimaml": this_tree}
    if args.baseline:
        trees["baseline"] = os.path.abspath(args.baseline)
    repeats = {"W1": args.w1_repeats, "W1b": args.w1_repeats, "W2": args.w2_repeats, "W2fo": args.w2_repeats,
               "RL": args.rl_iterations}
    print(f"# this tree {this_tree}" + (f", baseline {trees['baseline']}" if args.baseline else "")
          + f"; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; threads "
          + ("as the environment sets them" if args.threads is None else str(args.threads)))
    gemm = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", "GEMM"], capture_output=True,
                          text=True, check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join([this_tree, HERE])))
    print(f"# float32 GEMM (2000 x 2000 x 2000, NumPy's BLAS, these threads): {gemm.stdout.split()[-1]} GFLOP/s")
    print("who workload median_ms min_ms peak_MiB hash")
    medians, minima, extras = {}, {}, {}
    for round_ in range(args.rounds):
        for workload in args.only:
            order = list(trees.items())
            for who, tree in order[::-1] if round_ % 2 else order:  # every other round the baseline first
                if workload != "RL" and who == "baseline" and workload not in ("W1", "W2"):
                    continue  # the baseline is timed on one workload of each kind, and on RL
                median, best, peak, digest = run_minimaml(tree, workload, repeats[workload])
                medians.setdefault((who, workload), []).append(median)
                minima.setdefault((who, workload), []).append(best)
                extras[(who, workload)] = (peak, digest)
                print(f"{who} {workload} {median:.2f} {best:.2f} {peak:.1f} {digest}", flush=True)
            for peer, _ in PEER_GOALS.get(workload, ()):
                timing = run_peer(peer, workload, repeats[workload],
                                  _malloc_env() if workload in ("W1", "W1b") else None)
                if timing is not None:
                    medians.setdefault((peer, workload), []).append(timing[0])
                    minima.setdefault((peer, workload), []).append(timing[1])
                    print(f"{peer} {workload} {timing[0]:.2f} {timing[1]:.2f}", flush=True)

    print("\n| goal | ratio of medians per round (other / minimaml) | median | target | met | ratio of the "
          "minima per round |")
    print("|---|---|---:|---:|---|---|")

    def row(label, other, target):
        ratios = [o / m for o, m in zip(medians[other], medians[("minimaml", other[1])])]
        of_minima = [o / m for o, m in zip(minima[other], minima[("minimaml", other[1])])]
        mid = statistics.median(ratios)
        met = "yes" if mid >= target else "no"
        print(f"| {label} | {' '.join(f'{r:.2f}' for r in ratios)} | {mid:.2f} | {target} | {met} | "
              f"{' '.join(f'{r:.2f}' for r in of_minima)} |")

    for workload in args.only:
        for peer, target in PEER_GOALS.get(workload, ()):
            if (peer, workload) in medians:
                row(f"{workload}: {peer} / minimaml", (peer, workload), target)
            else:
                print(f"| {workload}: {peer} / minimaml | peer not set up (BENCH_PYTHON, BENCH_PEERS) | | "
                      f"{target} | - | |")
        if ("baseline", workload) in medians:
            row(f"{workload}: baseline / minimaml", ("baseline", workload), BASELINE_GOALS.get(workload, 1.0))
    if args.baseline:
        print("\n| workload | peak MiB, baseline | this tree | result bit-identical |")
        print("|---|---:|---:|---|")
        for workload in args.only:
            if ("baseline", workload) in extras:
                (base_peak, base_hash), (peak, digest) = extras[("baseline", workload)], extras[("minimaml", workload)]
                print(f"| {workload} | {base_peak:.1f} | {peak:.1f} | {'yes' if base_hash == digest else 'no'} |")
    print("\nrun_all.py quick (goal: 10 minutes on 2 quiet cores): time it by itself, `time python run_all.py`.")


if __name__ == "__main__":
    main()
