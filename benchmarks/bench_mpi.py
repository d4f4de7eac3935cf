"""Time a meta-step in one process with 1 and 2 threads and over 2 MPI ranks of one thread each, in one
run, the three set-ups alternating round by round (the ``.[mpi]`` extra):

    python benchmarks/bench_mpi.py [--steps w2 miniimagenet cheetah_direction] [--repeats 5] [--rounds 3]

Steps (float32, the split of ``minimaml.distributed`` as the experiments use it):

- ``w2``: the Omniglot Conv4 (64 filters, 28x28) on 32 tasks of 5-way 1-shot with 15 queries a class,
  one inner step, second order: the W2 meta-step;
- ``miniimagenet``: ``miniimagenet_conv4`` (32 filters, 84x84x3) on the 1-shot setting's 4 tasks,
  5 inner steps, first order (``experiments.miniimagenet.config(1, "first_order", "full")``);
- ``cheetah_direction``: one MAML-TRPO meta-iteration of the locomotion command (``rl_common.MetaStep``:
  sampling 10 tasks x 10 trajectories of 200 MuJoCo steps before and after the inner step, then the TRPO
  step), the quick profile's sizes, the same iteration (seed 0, iteration 0) every time (the
  ``.[mujoco]`` extra too).

The supervised steps (random inputs) take this rank's share of the tasks, ``maml.meta_gradient`` and
``distributed.sum_over_ranks``; the RL step shares out its tasks itself (``maml_rl.meta_iteration``).

Each (round, set-up) is its own process (``mpiexec -n 2`` for the ranks; MPICH's ``mpiexec`` beside this
Python, or on PATH); it prints ``step setup median_ms min_ms`` over ``--repeats`` steps after one
untimed one (freed arrays kept for reuse, ``minimaml.allocator``, as the training commands do), and a
last table gives each set-up's median over the rounds. The numbers are printed,
never asserted; on a machine shared with other jobs they are noisy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy

from minimaml import autodiff as ad
from minimaml import allocator, distributed, maml, train
from minimaml.experiments import locomotion, miniimagenet, rl_common
from minimaml.nn.conv4 import Conv4, miniimagenet_conv4

SETUPS = {"1 process, 1 thread": (0, 1), "1 process, 2 threads": (0, 2), "2 ranks, 1 thread each": (2, 1)}
STEPS = ("w2", "miniimagenet", "cheetah_direction")


def random_tasks(rng, n_tasks: int, k_shot: int, q_query: int, size: int, channels: int, n_way: int = 5):
    def examples(per_class):
        x = rng.random((n_tasks, n_way * per_class, size, size, channels), dtype=numpy.float32)
        y = numpy.tile(numpy.repeat(numpy.arange(n_way), per_class), (n_tasks, 1))
        return maml.Examples(x, y)
    return maml.TaskBatch(examples(k_shot), examples(q_query))


def problem(name: str):
    """(task_loss, params, tasks, inner_lr, inner_steps, mode) of a step, the same on every rank."""
    rng = numpy.random.default_rng(0)
    if name == "w2":
        net = Conv4(image_size=28, in_channels=1, filters=64, stride=2, padding=1, features="flatten",
                    bn_eps=1e-5, bn_scale=True, conv_bias=False)
        tasks = random_tasks(rng, 32, 1, 15, 28, 1)
        settings = (0.4, 1, "second_order")
    else:
        cfg = miniimagenet.config(1, "first_order", "full")
        net = miniimagenet_conv4()
        tasks = random_tasks(rng, cfg.meta_batch_size, 1, cfg.q_train, 84, 3)
        settings = (cfg.inner_lr, cfg.inner_steps, cfg.mode)
    params = net.init(rng, 5, numpy.float32)
    return (maml.supervised_loss(net.apply, ad.softmax_cross_entropy), params, tasks) + settings


def meta_step(name: str):
    """The step ``name`` as a function of nothing, the same work on every rank."""
    if name == "cheetah_direction":
        cfg = locomotion.config("quick", env=name)
        env = rl_common.build_env(cfg)
        params = rl_common.init_policy(env, cfg.seed, cfg.init_output_scale)
        iteration = rl_common.MetaStep(env, cfg)
        return lambda: iteration(params, {}, train.iteration_rng(cfg.seed, 0), 0)
    task_loss, params, tasks, inner_lr, inner_steps, mode = problem(name)

    def step():
        loss, grads, _ = maml.meta_gradient(task_loss, params, distributed.share_tasks(tasks), inner_lr,
                                            inner_steps, mode=mode)
        return distributed.sum_over_ranks(loss, grads)

    return step


def time_step(name: str, repeats: int) -> None:
    """One set-up's timing (run under the threads / ranks it is given)."""
    allocator.keep_freed_memory()  # as the training commands and the other benchmarks do
    step = meta_step(name)
    step()
    times = []
    for _ in range(repeats):
        distributed.barrier()
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    times = distributed.broadcast(times)  # rank 0's clock
    if distributed.is_root():
        print(f"{statistics.median(times):.0f} {min(times):.0f}", flush=True)


def mpiexec() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.path.exists(beside) else shutil.which("mpiexec")
    if found is None:
        raise SystemExit("bench_mpi: mpiexec not found; install the extra: pip install -e '.[mpi]'")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        time_step(args.worker, args.repeats)
        return
    print(f"# {os.cpu_count()} cores visible; set-ups alternate round by round")
    print("round step setup median_ms min_ms")
    medians = {}
    for round_ in range(args.rounds):
        for name in args.steps:
            for setup, (ranks, threads) in SETUPS.items():
                env = {**os.environ, "MINIMAML_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                       "OPENBLAS_NUM_THREADS": str(threads), "MINIMAML_DEVICE": "cpu"}
                command = [sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats)]
                if ranks:
                    command = [mpiexec(), "-n", str(ranks)] + command
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                median, best = out.stdout.split()[-2:]
                medians.setdefault((name, setup), []).append(float(median))
                print(f"{round_} {name} {setup!r} {median} {best}", flush=True)
    print("\nstep | set-up | median over rounds of the per-round medians (ms) | 1 process, 1 thread / this")
    for (name, setup), values in medians.items():
        ratio = statistics.median(medians[(name, next(iter(SETUPS)))]) / statistics.median(values)
        print(f"{name} | {setup} | {statistics.median(values):.0f} | {ratio:.2f}x")


if __name__ == "__main__":
    main()
