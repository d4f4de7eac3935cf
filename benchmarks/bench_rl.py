"""Speed of the MAML-RL pieces: the batched sampler, and one MAML-TRPO meta-iteration split into its parts.

    python benchmarks/bench_rl.py [--envs navigation cheetah_direction] [--meta-batch 20] [--n-traj 20]
        [--iterations 3] [--blas-threads 1]

1. Sampler: environment steps per second of ``sampler.sample_trajectories`` for T tasks x B trajectories
   stepped together (the policy, 2 x 100 ReLU, evaluated once per time step for all T x B of them), split
   into the environment's and the policy's share. The policy is the untrained one, so no episode ends
   early: every run is T x B x horizon steps.
2. Meta-iteration: ``maml_rl.meta_iteration`` on the same env, seconds spent sampling (pre- and
   post-update trajectories), in the inner REINFORCE step, on the meta-gradient and the Fisher-product
   graph, in conjugate gradient (10 exact Fisher-vector products) and in the line search; the medians
   over ``--iterations`` iterations after one untimed warm-up. Twice, in the same run and on the same
   seeds: with the library's Fisher products, sum_i J_i^T F'_i J_i from second-order products
   (``maml_rl.meta_fisher_product``), and with the tape's third-order reverse over reverse through the
   inner step (``third_order_fisher=True``, the earlier path); the last column is their ratio.
3. Fisher products alone, on one meta-batch: the seconds of one product F v by each path, timed
   alternately (``--products`` each, medians, so that a busy machine slows both alike), and the peak
   memory (``tracemalloc``, which sees NumPy's arrays) of a whole TRPO step with each.
   The library holds no timing code: the benchmark times it from outside, by wrapping, for the timed
   iterations only, the module-level functions the iteration calls (``Parts``): ``maml_rl.sample``,
   ``maml.adapt`` (outside TRPO: the inner step; inside TRPO's objective it is part of the other parts),
   ``trpo.trpo_step``, ``trpo.conjugate_gradient`` and ``trpo.line_search``. "gradient + graph" is
   TRPO's step minus CG and line search: the surrogate, its gradient and grad D recorded for the
   Fisher-vector products.

BLAS runs single-threaded by default (``--blas-threads``; set before NumPy loads), as in the training
runs, where two threads would compete with a second job or the simulator; freed memory is kept for
reuse (``minimaml.allocator``), as the training commands do. MuJoCo envs need the optional extra
(``pip install -e '.[mujoco]'``); without it they are skipped with a note.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["navigation", "cheetah_direction"])
    parser.add_argument("--meta-batch", type=int, default=20, help="tasks T")
    parser.add_argument("--n-traj", type=int, default=20, help="trajectories per task B")
    parser.add_argument("--iterations", type=int, default=3, help="timed meta-iterations per env")
    parser.add_argument("--products", type=int, default=5, help="timed Fisher products per path")
    parser.add_argument("--blas-threads", type=int, default=1)
    return parser.parse_args(argv)


ARGS = parse_args()
for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = str(ARGS.blas_threads)

import functools  # noqa: E402  (after the BLAS thread count is fixed)
import statistics  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402

from minimaml import autodiff as ad  # noqa: E402
from minimaml import algorithms, allocator, maml  # noqa: E402
from minimaml.experiments import locomotion, navigation  # noqa: E402
from minimaml.experiments.rl_common import RLConfig, build_env, init_policy  # noqa: E402
from minimaml.nn import policy as pol  # noqa: E402
from minimaml.rl import maml_rl, trpo  # noqa: E402
from minimaml.rl.reinforce import reinforce_loss  # noqa: E402
from minimaml.rl.sampler import sample_trajectories  # noqa: E402

PARTS = ("sampling", "inner", "gradient", "cg", "line_search")


def config_for(env_name: str) -> RLConfig:
    """The experiment's settings for ``env_name`` (navigation: alpha 0.5, actions x 0.1; locomotion:
    alpha 0.1), with the benchmark's T and B."""
    sizes = dict(meta_batch_size=ARGS.meta_batch, n_traj=ARGS.n_traj)
    if env_name == "navigation":
        return navigation.config("quick", **sizes)
    return locomotion.config("quick", env=env_name, **sizes)


class Parts:
    """Seconds spent in module-level functions, timed from outside: ``with Parts() as parts:`` replaces
    each function in ``WRAPPED`` by a timing wrapper (the module attribute, which is what the library's
    callers look up at call time) and puts the original back on exit. A part named in ``unless_inside``
    is not timed while that part runs (``maml.adapt`` counts as the inner step only outside TRPO).
    ``calls`` counts the timed calls, so a part the iteration no longer reaches shows as an error,
    not as 0 seconds."""

    # (module, function, part, unless inside part)
    WRAPPED = ((maml_rl, "sample", "sampling", None),
               (maml, "adapt", "inner", "trpo"),
               (trpo, "trpo_step", "trpo", None),
               (trpo, "conjugate_gradient", "cg", None),
               (trpo, "line_search", "line_search", None))

    def __init__(self):
        self.seconds, self.calls, self._depth, self._originals = defaultdict(float), defaultdict(int), \
            defaultdict(int), []

    def _wrap(self, function, part, unless_inside):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if unless_inside is not None and self._depth[unless_inside]:
                return function(*args, **kwargs)
            self._depth[part] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
                self.calls[part] += 1
                self._depth[part] -= 1
        return timed

    def __enter__(self):
        for module, name, part, unless_inside in self.WRAPPED:
            original = getattr(module, name)
            self._originals.append((module, name, original))
            setattr(module, name, self._wrap(original, part, unless_inside))
        return self

    def __exit__(self, *exc):
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)
        self._originals.clear()
        return False

    def shares(self, total: float) -> dict:
        """The table's parts (seconds); gradient + graph = TRPO's step less its CG and line search."""
        missing = [part for part in ("sampling", "inner", "trpo", "cg", "line_search") if not self.calls[part]]
        if missing:
            raise RuntimeError(f"bench_rl: the meta-iteration never called the wrapped function(s) of "
                               f"{missing}: the library calls them some other way now; update Parts.WRAPPED")
        s = self.seconds
        return {"sampling": s["sampling"], "inner": s["inner"], "gradient": s["trpo"] - s["cg"] - s["line_search"],
                "cg": s["cg"], "line_search": s["line_search"], "total": total}


class TimedPolicy:
    """Wraps the sampler's policy to add up the seconds spent in it."""

    def __init__(self, policy):
        self.policy, self.seconds = policy, 0.0

    def __call__(self, obs):
        start = time.perf_counter()
        out = self.policy(obs)
        self.seconds += time.perf_counter() - start
        return out


def bench_sampler(env, params, cfg: RLConfig) -> dict:
    rng = np.random.default_rng(0)
    tasks = env.sample_tasks(rng, cfg.meta_batch_size)
    sample_trajectories(env, pol.sampler_policy(params), tasks, cfg.n_traj, rng)  # warm-up
    policy = TimedPolicy(pol.sampler_policy(params))
    start = time.perf_counter()
    batch = sample_trajectories(env, policy, tasks, cfg.n_traj, rng)
    seconds = time.perf_counter() - start
    steps = int(batch["mask"].sum())
    return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
            "policy_share": policy.seconds / seconds}


def bench_meta_iteration(env, params, cfg: RLConfig, third_order_fisher: bool) -> dict:
    def iteration(rng):
        return maml_rl.meta_iteration(env, params, rng, cfg.trpo(), cfg.meta_batch_size, cfg.n_traj,
                                      algorithms.make("maml", cfg.inner_lr, 1), cfg.discount, cfg.gae_lambda,
                                      third_order_fisher)

    iteration(np.random.default_rng(1))  # warm-up
    records = []
    for i in range(ARGS.iterations):
        with Parts() as parts:
            start = time.perf_counter()
            iteration(np.random.default_rng([2, i]))
            total = time.perf_counter() - start
        records.append(parts.shares(total))
    return {key: statistics.median(r[key] for r in records) for key in PARTS + ("total",)}


def bench_fisher(env, params, cfg: RLConfig) -> dict:
    """Seconds per Fisher product and peak MB of one TRPO step, for ``meta_fisher_product`` ("fast") and
    the tape's third-order product ("third"), on the same pre- and post-update trajectories."""
    rng = np.random.default_rng(3)
    tasks = env.sample_tasks(rng, cfg.meta_batch_size)
    _, pre = maml_rl.sample(env, params, tasks, rng, cfg.n_traj)
    adapted = maml.adapt(reinforce_loss, params, pre, cfg.inner_lr, 1)
    _, post = maml_rl.sample(env, adapted, tasks, rng, cfg.n_traj)
    objective = maml_rl.meta_objective(pre, post, adapted, cfg.inner_lr)
    fast_product = maml_rl.meta_fisher_product(pre, post, adapted, cfg.inner_lr)
    names = list(params)
    leaves = [ad.Tensor(params[k], requires_grad=True) for k in names]
    _, kl = objective(dict(zip(names, leaves)), create_graph=True)
    products = {"fast": fast_product(params), "third": trpo.fisher_vector_product(kl, leaves, damping=0.0)}
    v = np.random.default_rng(4).standard_normal(trpo.flatten(params.values()).size)
    v_dict = dict(zip(names, trpo.unflatten(v, params.values())))
    calls = {"fast": lambda: products["fast"](v_dict), "third": lambda: products["third"](v)}
    seconds = defaultdict(list)
    for _ in range(ARGS.products + 1):  # the first round is a warm-up
        for path, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[path].append(time.perf_counter() - start)
    out = {f"{path}_s": statistics.median(times[1:]) for path, times in seconds.items()}
    del products, calls, kl, leaves
    for path, fisher in (("fast", fast_product), ("third", None)):
        tracemalloc.start()
        cfg.trpo().step(objective, params, fisher)
        out[f"{path}_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return out


def main() -> None:
    kept = allocator.keep_freed_memory()  # as the training commands run
    print(f"# BLAS threads {ARGS.blas_threads}; freed memory {'kept' if kept else 'as the environment sets it'}; "
          f"T = {ARGS.meta_batch} tasks x B = {ARGS.n_traj} trajectories; medians of {ARGS.iterations} meta-iterations")
    rows, fisher_rows = [], []
    for name in ARGS.envs:
        cfg = config_for(name)
        try:
            env = build_env(cfg)
        except ImportError as err:
            print(f"{name}: skipped ({err})")
            continue
        params = init_policy(env, seed=0)
        sampler = bench_sampler(env, params, cfg)
        for fisher, third_order in (("J^T F' J", False), ("third order", True)):
            rows.append((name, env.horizon, sampler, fisher, bench_meta_iteration(env, params, cfg, third_order)))
        fisher_rows.append((name, bench_fisher(env, params, cfg)))

    print("\n| env | horizon | sampler steps/s | policy share | Fisher products | meta-iteration s | sampling | "
          "inner step | gradient + graph | CG | line search | third order / this |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, horizon, sampler, fisher, meta in rows:
        third = next(m for n, _, _, f, m in rows if n == name and f == "third order")
        shares = " | ".join(f"{meta[key]:.2f} ({100 * meta[key] / meta['total']:.0f}%)" for key in PARTS)
        print(f"| {name} | {horizon} | {sampler['steps_per_s']:,.0f} | {100 * sampler['policy_share']:.0f}% | "
              f"{fisher} | {meta['total']:.2f} | {shares} | {third['total'] / meta['total']:.2f}x "
              f"(CG {third['cg'] / meta['cg']:.1f}x) |")


    print(f"\n| env | Fisher product, J^T F' J | third order | ratio | peak MB of a TRPO step, J^T F' J | third order |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, f in fisher_rows:
        print(f"| {name} | {f['fast_s']:.3f} s | {f['third_s']:.3f} s | {f['third_s'] / f['fast_s']:.2f}x | "
              f"{f['fast_peak_mb']:.0f} | {f['third_peak_mb']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
