"""How loud is the untrained policy? The initial policy's behaviour and its first inner step, for
output-layer scales and seeds (docs/rl.md, "A quiet initial policy").

    python benchmarks/rl_initial_policy.py [--env cheetah_direction] [--scales 1 0.01] [--seeds 0 1 2]

For each scale (``rl_common.init_policy(env, seed, output_scale)``) and seed it prints:

- the return of the noise-free policy (its mean action, std ~0) on a forward (+1) and a backward (-1)
  direction task (cheetah direction: return ~ displacement / dt less the control cost): a quiet policy
  stands still and scores about the same on both; a loud one runs one way;
- the average return of 20 trajectories of the policy (std 1) on 10 tasks, before and after one inner
  REINFORCE step (alpha = 0.1, ``maml.adapt``), and that step's size as KL(pi || pi') on the
  pre-update trajectories (2D navigation's is ~0.007).

Numbers are printed, never asserted. Needs the MuJoCo extra.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from minimaml import autodiff as ad  # noqa: E402
from minimaml import maml  # noqa: E402
from minimaml.experiments import locomotion  # noqa: E402
from minimaml.experiments.rl_common import build_env, init_policy  # noqa: E402
from minimaml.nn import policy as pol  # noqa: E402
from minimaml.rl import maml_rl  # noqa: E402
from minimaml.rl.reinforce import masked_task_mean, reinforce_loss  # noqa: E402


def inner_step_kl(params, adapted, data) -> float:
    """Mean over tasks of E_data[KL(pi_params || pi_adapted)]."""
    with ad.no_grad():
        mean, log_std = pol.apply(params, data.obs)
        mean_adapted, log_std_adapted = pol.apply(adapted, data.obs)
        kl = pol.gaussian_kl(mean, log_std, mean_adapted, log_std_adapted)
        return float(masked_task_mean(kl, data.mask).data.mean())


def measure(env, params, inner_lr: float) -> dict:
    rng = np.random.default_rng(100)
    noise_free = {**params, "log_std": params["log_std"] - 20.0}
    directions, _ = maml_rl.sample(env, noise_free, np.array([1.0, -1.0]), rng, 1)
    tasks = env.sample_tasks(rng, 10)
    before, pre = maml_rl.sample(env, params, tasks, rng, 20)
    adapted = maml.adapt(reinforce_loss, params, pre, inner_lr, 1)
    after, _ = maml_rl.sample(env, adapted, tasks, rng, 20)
    return {"forward": float(directions["episode_returns"][0, 0]),
            "backward": float(directions["episode_returns"][1, 0]),
            "kl": inner_step_kl(params, adapted, pre),
            "before": float(before["episode_returns"].mean()), "after": float(after["episode_returns"].mean())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="cheetah_direction", choices=("cheetah_direction", "ant_direction"))
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.01])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    cfg = locomotion.config("quick", env=args.env)
    env = build_env(cfg)
    print(f"# {args.env}: noise-free return on a +1 / -1 task; 10 tasks x 20 trajectories before and after one "
          f"inner step (alpha {cfg.inner_lr}); KL(pi || pi') of that step")
    print("| output scale | seed | noise-free +1 | noise-free -1 | return before | after | KL |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for scale in args.scales:
        for seed in args.seeds:
            m = measure(env, init_policy(env, seed, scale), cfg.inner_lr)
            print(f"| {scale:g} | {seed} | {m['forward']:.1f} | {m['backward']:.1f} | {m['before']:.1f} | "
                  f"{m['after']:.1f} | {m['kl']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
