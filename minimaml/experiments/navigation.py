"""2D navigation (paper Sec. 5.3, Fig. 4): MAML-TRPO, the pretrained baseline and random initialisation.

A point agent starts at the origin and must reach a goal drawn from U[-0.5, 0.5]^2 in 100 steps, reward
the negative distance (``rl.envs.Navigation2D``). Paper settings: meta-batch 20 tasks, 20 trajectories
per task and step, alpha = 0.5 (the authors' code; the paper's text says 0.1: ``--inner-lr 0.1``), TRPO
with KL 0.01. As in the authors' code (rllab's ``normalize``), the policy acts in [-1, 1] units scaled by
0.1 before the env's clip to [-0.1, 0.1] (``--action-scale 1`` feeds raw actions instead).
Evaluation on 40 fixed test tasks, return after 0..3 steps; figures: the curves beside the paper's
and the trajectories of three test tasks before and after 1..3 steps.

    python -m minimaml.experiments.navigation --profile quick           # about 12 minutes on 2 busy cores
    python -m minimaml.experiments.navigation --profile full --resume   # the authors' script
    OPENBLAS_NUM_THREADS=1 MINIMAML_THREADS=1 mpiexec -n 2 python -m minimaml.experiments.navigation   # 2 ranks

Profiles: ``quick`` = the paper's text (meta-batch 20, also the setting of the authors' checkpoint behind the
paper's figure, named ``..._mbs20_...`` in their test script) with the authors' n_itr = 100 MAML iterations
(measured 4.5-8 s each on one busy core) and 50 TRPO iterations for the pretrained baseline (~2 s each);
``full`` = the authors' ``maml_trpo_point.py``: meta-batch 40, 100 iterations, and 100 for the
pretrained baseline; ``smoke`` = 5 iterations of each and 10 test tasks, a check that it all runs.
"""

from __future__ import annotations

import os

from .. import allocator, distributed
from . import rl_common
from . import rl_figures as figures
from .common import (COMMAND_ERRORS, allowed_changes, check_config, config_parser, exit_with_error, log,
                     overrides_from_args)
from .rl_common import RLConfig

PROFILES = ("quick", "smoke", "full")
TRAJECTORY_TASKS = 3  # test tasks drawn in the trajectory figure


def config(profile: str = "quick", **overrides) -> RLConfig:
    """The settings of a profile (see the module docstring), with overrides, checked."""
    if profile not in PROFILES:
        raise ValueError(f"navigation: unknown profile {profile!r}; expected one of {PROFILES}")
    settings = dict(profile=profile, env="navigation", meta_batch_size=20, n_traj=20, inner_lr=0.5,
                    action_scale=0.1, out_dir=f"runs/{profile}/navigation")
    if profile == "full":
        settings.update(meta_batch_size=40, maml_iterations=100, pretrain_iterations=100)
    elif profile == "smoke":  # a check that everything runs, not a result
        settings.update(maml_iterations=5, pretrain_iterations=5, n_test_tasks=10)
    else:
        settings.update(maml_iterations=100, pretrain_iterations=50)
    cfg = RLConfig(**{**settings, **overrides})
    check_config(cfg)
    return cfg


def _env():
    from ..rl.envs import make_env
    return make_env("navigation")


def run(cfg: RLConfig, resume: bool = False, progress: bool = True, allow_changes=(), overwrite: bool = False) -> dict:
    """Train, evaluate, write results.json / results.md and the figures into ``cfg.out_dir`` (under
    MPI: rank 0)."""
    results, shown = rl_common.run(cfg, resume=resume, progress=progress, n_show=TRAJECTORY_TASKS,
                                   allow_changes=allow_changes, overwrite=overwrite)
    if distributed.is_root():
        goals = rl_common.test_tasks(_env(), cfg)[:TRAJECTORY_TASKS]
        figures.plot_trajectories(shown, goals, rl_common.LABELS,
                                  os.path.join(cfg.out_dir, "navigation_trajectories.png"))
    return results


def run_profile(profile: str, resume: bool = False, progress: bool = True, overwrite: bool = False) -> tuple:
    """run_all's entry: (markdown table, [output folder])."""
    cfg = config(profile)
    return rl_common.results_markdown(run(cfg, resume=resume, progress=progress,
                                                          overwrite=overwrite)), [cfg.out_dir]


def main(argv=None):
    parser = config_parser(RLConfig, __doc__, {"navigation": config}, PROFILES, skip=("env",))
    args = parser.parse_args(argv)
    try:
        cfg = config(args.profile, **overrides_from_args(RLConfig, args))
        results = run(cfg, resume=args.resume, progress=not args.no_progress, allow_changes=allowed_changes(args),
                      overwrite=args.overwrite)
    except COMMAND_ERRORS as err:
        exit_with_error(parser, err)
    log(rl_common.results_markdown(results))  # under MPI: rank 0 alone


if __name__ == "__main__":
    allocator.keep_freed_memory()  # big arrays reused from step to step
    main()
