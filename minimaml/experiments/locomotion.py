"""MuJoCo locomotion (paper Sec. 5.3, Fig. 5): half-cheetah and ant, goal velocity and goal direction.

MAML-TRPO, the pretrained baseline and random initialisation on ``cheetah_velocity``,
``cheetah_direction``, ``ant_velocity`` or ``ant_direction`` (``rl.mujoco_envs``: gymnasium's v5 models
with the paper's rewards; needs ``pip install -e '.[mujoco]'``). Paper settings: horizon 200, meta-batch
40 tasks, 20 trajectories per task and step (ant direction 40), alpha = 0.1, TRPO with KL 0.01;
evaluation on 40 fixed test tasks, return after 0..3 steps, each step on 4000 time steps (20 whole
trajectories; fewer steps per trajectory, so more of them, when the ant falls), as the authors' tests.
Where the authors' code differs, the profiles follow the code (each a flag): cheetah direction trains
with max KL 0.02 (``--max-kl``), cheetah velocity with 10 trajectories per inner step in the full
profile (``--n-traj``), and the baselines are fine-tuned at test with step 0.2 (pretrained,
``--pretrained-lr``) and 1.0 (random init, ``--random-lr``) instead of alpha. The initial policy is quiet
(output layer x 0.01, ``--init-output-scale``; docs/rl.md).

    python -m minimaml.experiments.locomotion --env cheetah_direction --profile quick
    python -m minimaml.experiments.locomotion --env cheetah_velocity --profile reduced --resume
    python -m minimaml.experiments.locomotion --env ant_direction --profile full --meta-batch-size 20
    OPENBLAS_NUM_THREADS=1 MINIMAML_THREADS=1 mpiexec -n 2 python -m minimaml.experiments.locomotion --profile reduced

Profiles (every field can still be overridden by its flag):

- ``quick``: meta-batch 10, 10 trajectories, 30 MAML and 30 pretrained iterations (minutes; a smoke run);
- ``reduced``: meta-batch 20, 10 trajectories, 250 MAML and 50 pretrained iterations (~45 minutes for
  the cheetah on one busy core: measured 7-12 s per MAML and ~4-8 s per pretrained iteration, ~2 minutes
  of evaluation; a finished run extends with ``--resume --maml-iterations N``);
- ``full``: the paper's batch sizes and the 800 meta-iterations of the authors' launch scripts (the
  paper's cheetah-direction numbers come from their iteration-100 checkpoint), 500 TRPO iterations for
  the pretrained baseline.
"""

from __future__ import annotations

import functools

from .. import allocator
from . import rl_common
from .common import (COMMAND_ERRORS, allowed_changes, check_config, config_parser, exit_with_error, log,
                     overrides_from_args)
from .rl_common import RLConfig

TASKS = ("cheetah_velocity", "cheetah_direction", "ant_velocity", "ant_direction")
PROFILES = ("quick", "smoke", "reduced", "full")
PROFILE_SETTINGS = {
    "smoke": dict(meta_batch_size=4, n_traj=4, maml_iterations=2, pretrain_iterations=2, n_test_tasks=4),  # it runs
    "quick": dict(meta_batch_size=10, n_traj=10, maml_iterations=30, pretrain_iterations=30),
    "reduced": dict(meta_batch_size=20, n_traj=10, maml_iterations=250, pretrain_iterations=50),
    "full": dict(meta_batch_size=40, n_traj=20, maml_iterations=800, pretrain_iterations=500),
}
# The authors' settings where a task's differ from the common ones (cbfinn/maml_rl's launch scripts): the
# cheetah-direction policy behind the paper's numbers was trained with max KL 0.02 (its checkpoint is
# iteration 100), cheetah velocity with 10 trajectories per inner step, ant direction with 40 (the paper).
TASK_SETTINGS = {"cheetah_direction": dict(max_kl=0.02), "cheetah_velocity": {}, "ant_velocity": {},
                 "ant_direction": {}}
FULL_TASK_SETTINGS = {"cheetah_velocity": dict(n_traj=10), "ant_direction": dict(n_traj=40)}
# The authors' test scripts fine-tune the baselines with their own step sizes (the paper says alpha).
BASELINE_TEST_LRS = dict(pretrained_lr=0.2, random_lr=1.0)
PROFILE_TASKS = {"quick": ("cheetah_direction",), "smoke": ("cheetah_direction",),
                 "reduced": ("cheetah_direction", "cheetah_velocity"),
                 "full": TASKS}


def config(profile: str = "quick", env: str = "cheetah_direction", **overrides) -> RLConfig:
    """The settings of a profile and task (see the module docstring), with overrides, checked."""
    if profile not in PROFILES:
        raise ValueError(f"locomotion: unknown profile {profile!r}; expected one of {PROFILES}")
    if env not in TASKS:
        raise ValueError(f"locomotion: unknown task {env!r}; expected one of {TASKS}")
    settings = dict(profile=profile, env=env, inner_lr=0.1, checkpoint_every=5,
                    out_dir=f"runs/{profile}/{env}", **PROFILE_SETTINGS[profile], **TASK_SETTINGS[env],
                    **BASELINE_TEST_LRS)
    if profile == "full":
        settings.update(FULL_TASK_SETTINGS.get(env, {}))
    cfg = RLConfig(**{**settings, **overrides})
    check_config(cfg)
    return cfg


def run(cfg: RLConfig, resume: bool = False, progress: bool = True, allow_changes=(), overwrite: bool = False) -> dict:
    """Train, evaluate, write results.json / results.md and the figures into ``cfg.out_dir``. Raises an
    ImportError that says how to install MuJoCo when the optional extra is missing."""
    results, _ = rl_common.run(cfg, resume=resume, progress=progress, allow_changes=allow_changes,
                              overwrite=overwrite)
    return results


def run_profile(profile: str, resume: bool = False, progress: bool = True, overwrite: bool = False) -> tuple:
    """run_all's entry: quick = cheetah direction; reduced = both cheetah tasks; full = all four.
    Returns (markdown, [output folders])."""
    tables, folders = [], []
    for env in PROFILE_TASKS[profile]:
        cfg = config(profile, env=env)
        tables.append(rl_common.results_markdown(run(cfg, resume=resume, progress=progress, overwrite=overwrite)))
        folders.append(cfg.out_dir)
    return "\n".join(tables), folders


def main(argv=None):
    examples = {env: functools.partial(config, env=env) for env in TASKS}
    parser = config_parser(RLConfig, __doc__, examples, PROFILES, skip=("env",))
    parser.add_argument("--env", choices=TASKS, default="cheetah_direction",
                        help="the locomotion task (default cheetah_direction)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in overrides_from_args(RLConfig, args).items() if k != "env"}
    try:
        cfg = config(args.profile, env=args.env, **overrides)
        results = run(cfg, resume=args.resume, progress=not args.no_progress, allow_changes=allowed_changes(args),
                      overwrite=args.overwrite)
    except ImportError as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
    except COMMAND_ERRORS as err:
        exit_with_error(parser, err)
    log(rl_common.results_markdown(results))  # under MPI: rank 0 alone


if __name__ == "__main__":
    allocator.keep_freed_memory()  # big arrays reused from step to step
    main()
