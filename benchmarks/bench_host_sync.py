"""Host synchronisations per training step, counted on the tests' strict stand-in for CuPy.

    python benchmarks/bench_host_sync.py [--steps 3] [--rl-iterations 1] [--skip-rl]

On a GPU every transfer of a device array to the host (``backend.to_numpy``, ``float()``, ``.item()``,
``bool()``) waits for the queued kernels to finish: a stall. The stand-in (``tests/strict_xp.py``, device
``strict``) counts each one and the line of minimaml that asked for it. This prints, per step of
``train.run`` as the experiments run it (no checkpoint, no validation):

- W1: the sinusoid experiment's MAML step (meta-batch 25, K = 10, MLP 1-40-40-1, one inner step, Adam),
  in each meta-gradient mode;
- W2: the Omniglot 5-way 1-shot step at the paper's settings (32 tasks, 15 queries a class, Conv4, one
  inner step of 0.4, Adam), on random images of Omniglot's shape;
- RL: one MAML-TRPO meta-iteration of 2D navigation at the quick profile (20 tasks x 20 trajectories
  before and after the inner step, 10 conjugate-gradient steps, the line search).

The counts do not depend on the machine; times are not measured (the stand-in says nothing of speed).
About 1.5 minutes of CPU with ``--steps 2``, most of it the RL iteration and W2 (``--skip-rl`` leaves
the first out). docs/autodiff.md ("Host synchronisations per step") says which syncs remain and why.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # the stand-in

from minimaml import backend, train  # noqa: E402
from minimaml.experiments import classification, navigation, omniglot, rl_common, sinusoid  # noqa: E402
from minimaml.nn import conv4  # noqa: E402


def counted(stand_in, run, steps: int) -> tuple:
    """(transfers per step, {(kind, line): per step}) of ``run(steps)`` after one untimed warm-up step."""
    run(1)
    stand_in.reset()
    run(steps)
    by_line = collections.Counter({key: n / steps for key, n in stand_in.transfers.items()})
    return stand_in.count() / steps, by_line


def train_steps(step, params):
    def run(steps):
        train.run(params, step, steps, seed=0, progress=False)
    return run


def w1(mode: str):
    config = sinusoid.Config.for_profile("quick", mode=mode)
    params = sinusoid.mlp.init(numpy.random.default_rng(0), scheme=config.init)
    return train_steps(sinusoid.meta_step(config, sinusoid.make_algorithm(config)), params)


def w2():
    config = omniglot.config(5, 1, "conv", "full")
    images = numpy.random.default_rng(0).integers(0, 256, size=(40, 20, 28, 28, 1), dtype=numpy.uint8)
    model = classification.make_model(config)
    params = model.init(numpy.random.default_rng(0), config.n_way)
    names = conv4.inner_param_names(params, adapt_bn_shift=config.adapt_bn_shift)
    algorithm = classification.make_algorithm(config, names)
    return train_steps(classification.meta_step(config, model, images, algorithm), params)


def rl():
    cfg = navigation.config("quick")
    env = rl_common.build_env(cfg)
    params = rl_common.init_policy(env, cfg.seed, cfg.init_output_scale)
    return train_steps(rl_common.MetaStep(env, cfg), params)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="counted steps of W1 and W2 (after a warm-up)")
    parser.add_argument("--rl-iterations", type=int, default=1, help="counted RL iterations (after a warm-up)")
    parser.add_argument("--skip-rl", action="store_true", help="leave the RL iteration out (the slowest)")
    args = parser.parse_args(argv)
    backend.set_device("strict")
    stand_in = backend.xp()  # the stand-in module itself
    cases = [(f"W1 {mode}", w1(mode), args.steps) for mode in ("second_order", "hvp", "first_order")]
    cases.append(("W2 second_order", w2(), args.steps))
    if not args.skip_rl:
        cases.append(("RL MAML-TRPO iteration", rl(), args.rl_iterations))
    print(f"{'step':24s} {'host syncs':>10s}  where (per step)")
    for name, run, steps in cases:
        total, by_line = counted(stand_in, run, steps)
        where = ", ".join(f"{line} {kind} x{n:g}" for (kind, line), n in sorted(by_line.items(), key=lambda kv: -kv[1]))
        print(f"{name:24s} {total:10g}  {where}", flush=True)


if __name__ == "__main__":
    main()
