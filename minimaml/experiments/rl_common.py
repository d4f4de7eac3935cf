"""What the RL experiments (2D navigation, locomotion) share: the config, the two TRPO steps, evaluation,
the report (the figures: ``rl_figures``).

Three policies are compared on the same fixed, seeded test tasks (paper Sec. 5.3, Figs. 4-5):

- ``maml``: meta-trained with ``maml_rl.meta_iteration`` (REINFORCE inner step, TRPO outer step);
- ``pretrained``: one policy trained by TRPO on trajectories of randomly drawn tasks, no inner step
  (the paper's "pretrained" baseline: the average task, then fine-tuned at test time like MAML);
- ``random``: the initial policy, untrained.

Each is fine-tuned on every test task with 0..``eval_steps`` REINFORCE steps (alpha, then alpha / 2, as
``maml_rl.adaptation_batches``) and scored by the average undiscounted return of fresh trajectories after
each step: mean and 95% CI over the test tasks. As in the authors' test scripts, every step samples whole
trajectories until they add up to ``test_batch_steps`` = 4000 time steps per task (rllab's VPG
``batch_size``): 40 trajectories on 2D navigation, more once episodes end at the goal; 20 on locomotion.

Training is the one loop, ``train.run``, with a TRPO step (``MetaStep``, ``PretrainStep``) in place of
Adam: iteration ``i`` gets the generator ``train.iteration_rng(seed, i)``, checkpoints are atomic every
``checkpoint_every`` iterations, ``resume=True`` continues (checking the settings), and a non-finite
parameter or return raises ``train.NonFiniteError``. The envs draw their initial-state noise from the
sampler's generator (the iteration's, or the test seed's), so an evaluation repeats exactly, on MuJoCo too
(``tests/test_rl_envs.py``), and a resumed run resets as the uninterrupted one.

Under MPI (``mpiexec -n R``, ``minimaml.distributed``) every rank draws the same tasks and samples its
share of them with one process's noise (``sampler.rank_share``): MAML-TRPO's step adds the shares'
parts (``maml_rl.meta_iteration``); the pretrained baseline gathers the shares' trajectories and takes
its TRPO step, one baseline fitted to the pooled batch, whole on every rank; evaluation splits each
chunk of test tasks and gathers the returns. Rank 0 holds the folder, writes and plots. Each
meta-batch and each chunk of test tasks needs at least one task per rank (``check_ranks``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np

from .. import algorithms, distributed, train
from ..nn import policy as pol
from ..rl import maml_rl
from ..rl.reinforce import trajectories
from ..rl.sampler import advantages, average_returns, rank_share, sample_trajectories
from ..rl.trpo import TRPO
from . import rl_figures as figures
from .common import (cell, guarded_arithmetic, log, markdown_table, run_folder, setting, summary, training_settings,
                     write_text, write_json)

METHODS = ("maml", "pretrained", "random")
LABELS = {"maml": "MAML", "pretrained": "pretrained", "random": "random init", "oracle": "oracle"}

# Finn et al. (2017), Figs. 4-5, from the authors' result files (cbfinn/maml_rl): average return after 0, 1, 2, 3
# steps and the 95% half-width, on 40 test tasks. The paper has no pretrained curve for 2D navigation.
PAPER = {
    "navigation": {
        "maml": ([-40.41, -11.68, -3.33, -3.23], [4.01, 2.16, 0.55, 0.58]),
        "random": ([-82.66, -57.96, -53.84, -46.81], [2.16, 1.84, 1.62, 1.28]),
        "oracle": ([-2.29] * 4, [0.14] * 4)},
    "cheetah_velocity": {
        "maml": ([-129.53, -78.57, -66.62, -60.78], [16.54, 9.85, 8.94, 8.62]),
        "pretrained": ([-158.00, -135.39, -128.47, -133.61], [17.35, 15.05, 13.98, 16.44]),
        "random": ([-254.83, -254.33, -246.79, -230.83], [35.71, 34.64, 35.36, 34.17]),
        "oracle": ([-54.47] * 4, [6.93] * 4)},
    "cheetah_direction": {
        "maml": ([-50.69, 293.19, 313.48, 315.65], [5.74, 17.01, 15.77, 13.85]),
        "pretrained": ([-43.03, -24.75, -12.85, 19.57], [11.61, 9.31, 8.55, 11.22]),
        "random": ([-35.73, 21.83, 62.32, 86.18], [1.27, 2.90, 5.03, 9.73]),
        "oracle": ([442.69] * 4, [8.38] * 4)},
    "ant_velocity": {
        "maml": ([30.58, 96.74, 100.06, 101.41], [30.03, 20.74, 21.46, 21.04]),
        "pretrained": ([-1.83, 6.11, 8.47, 9.47], [34.19, 34.36, 34.45, 36.52]),
        "random": ([-78.64, -62.81, -48.55, -35.56], [34.39, 34.72, 34.08, 29.89]),
        "oracle": ([107.89] * 4, [19.97] * 4)},
    "ant_direction": {
        "maml": ([8.66, 499.15, 500.68, 499.11], [14.21, 32.10, 31.54, 32.53]),
        "pretrained": ([3.16, 1.27, 6.51, 6.86], [15.21, 13.53, 13.77, 11.69]),
        "random": ([3.11, 9.25, 15.96, 26.11], [4.07, 4.36, 3.50, 0.11]),
        "oracle": ([524.80] * 4, [12.40] * 4)},
}


@dataclass
class RLConfig:
    """One RL experiment: an environment, the MAML-TRPO settings, the baselines and the evaluation.
    The experiments (``navigation.config``, ``locomotion.config``) fill it in for each profile."""

    profile: str = setting("quick", "which profile the other values come from", training=False)
    env: str = setting("navigation", "the task family (rl.envs.make_env)")
    maml_iterations: int = setting(100, "MAML-TRPO meta-iterations", least=0, training=False)
    pretrain_iterations: int = setting(100, "TRPO iterations of the pretrained baseline", least=0, training=False)
    meta_batch_size: int = setting(20, "tasks per meta-iteration (pretrained: tasks per TRPO batch)", least=1)
    n_traj: int = setting(20, "trajectories per task and inner step in training", least=1)
    inner_lr: float = setting(0.5, "inner REINFORCE step size alpha", positive=True)
    discount: float = setting(0.99, "discount gamma of the returns and GAE", positive=True, most=1.0)
    gae_lambda: float = setting(1.0, "GAE's lambda", least=0.0, most=1.0)
    max_kl: float = setting(0.01, "TRPO's trust region: the mean KL of a step", positive=True)
    cg_iters: int = setting(10, "conjugate-gradient iterations per TRPO step", least=1)
    cg_damping: float = setting(1e-5, "damping added to the Fisher-vector products", least=0.0)
    n_test_tasks: int = setting(40, "fixed test tasks", least=1, training=False)
    eval_steps: int = setting(3, "fine-tuning steps at test time (alpha, then alpha / 2)", least=0, most=100,
                             training=False)
    pretrained_lr: float = setting(0.5, "the pretrained baseline's first fine-tuning step size at test (then "
                                   "half of it); the paper: alpha; the authors' locomotion tests: 0.2",
                                   positive=True, training=False)
    random_lr: float = setting(0.5, "the random-init baseline's first fine-tuning step size at test; the paper: "
                               "alpha; the authors' locomotion tests: 1.0", positive=True, training=False)
    test_batch_steps: int = setting(4000, "time steps per test task and step (the authors' tests); 0 = n_traj "
                                    "trajectories", least=0, training=False)
    action_scale: float = setting(1.0, "policy actions x this before the env (rllab's normalize(); 0.1 for "
                                  "navigation)", positive=True)
    test_seed: int = setting(2017, "the fixed test tasks and evaluation noise, the same for every method",
                             training=False)
    seed: int = setting(0, "policy initialisation and training", least=0, most=2**32 - 1)
    init_output_scale: float = setting(0.01, "the initial policy's output-layer weights x this (0.01: a quiet "
                                       "policy whatever the seed; 1: rllab's Glorot init)", positive=True)
    checkpoint_every: int = setting(10, "iterations between checkpoints", least=1, training=False)
    methods: str = setting("maml,pretrained,random", "comma-separated subset of maml, pretrained, random",
                           training=False)
    out_dir: str = setting("runs/quick/navigation", "output folder (checkpoints, results, figures)",
                           training=False)

    def trpo(self) -> TRPO:
        return TRPO(max_kl=self.max_kl, cg_iters=self.cg_iters, damping=self.cg_damping)

    def test_lr(self, method: str) -> float:
        """The first fine-tuning step size of ``method`` at test time (then half of it)."""
        return {"maml": self.inner_lr, "pretrained": self.pretrained_lr, "random": self.random_lr}[method]

    def method_list(self) -> list:
        methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            raise ValueError(f"--methods: {self.methods!r} must name some of {', '.join(METHODS)}")
        return methods


class ScaledActions:
    """rllab's ``normalize(env)`` for a symmetric action box [-c, c]: the policy acts in [-1, 1] units,
    the env receives ``clip(scale * a, -c, c)`` (the env clips). The authors' 2D navigation ran inside it
    (box [-0.1, 0.1], so scale 0.1); gymnasium's MuJoCo boxes are already [-1, 1] (scale 1, no wrapper)."""

    def __init__(self, env, scale: float):
        self.env, self.scale = env, scale

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, actions):
        return self.env.step(self.scale * np.asarray(actions))


def build_env(cfg: RLConfig):
    """``cfg.env`` (``envs.make_env``), wrapped in ``ScaledActions`` when ``cfg.action_scale != 1``."""
    from ..rl.envs import make_env

    env = make_env(cfg.env)
    return env if cfg.action_scale == 1.0 else ScaledActions(env, cfg.action_scale)


# --- training ----------------------------------------------------------------------------------------
def init_policy(env, seed: int, output_scale: float = 0.01) -> dict:
    """The initial policy of every method (rllab's Glorot init with the output layer's weights x
    ``output_scale``, std 1; ``policy.init``): a function of ``seed`` only."""
    return pol.init(np.random.default_rng([seed, 0]), env.obs_dim, env.act_dim, output_scale=output_scale)


class TRPOStep(train.Step):
    """A training step of an RL method: the env and the config it samples and steps with."""

    def __init__(self, env, cfg: RLConfig):
        self.env, self.cfg = env, cfg


class MetaStep(TRPOStep):
    """One MAML-TRPO meta-iteration (``maml_rl.meta_iteration``) of MAML from ``algorithms.make``: one
    inner step of ``inner_lr``."""

    def __init__(self, env, cfg: RLConfig):
        super().__init__(env, cfg)
        self.algorithm = algorithms.make("maml", cfg.inner_lr, 1)

    def __call__(self, params, state, rng, iteration):
        cfg = self.cfg
        params, stats = maml_rl.meta_iteration(self.env, params, rng, cfg.trpo(), cfg.meta_batch_size, cfg.n_traj,
                                               self.algorithm, cfg.discount, cfg.gae_lambda)
        return params, state, {"return": stats["pre_return"], "adapted_return": stats["post_return"],
                               "kl": stats["kl"], "accepted": float(stats["accepted"]),
                               "cg_residual": stats["cg_residual"]}


class PretrainStep(TRPOStep):
    """One TRPO step of the pretrained baseline on ``meta_batch_size x n_traj`` trajectories of freshly
    drawn tasks, pooled into one batch with one linear baseline (the policy never sees which task it
    is on). Under MPI each rank samples its share of the tasks, and every rank takes the step on all the
    trajectories (the baseline's one fit needs them all)."""

    def __call__(self, params, state, rng, iteration):
        cfg = self.cfg
        tasks = self.env.sample_tasks(rng, cfg.meta_batch_size)
        my_tasks, my_rng = rank_share(tasks, rng)
        my_batch = sample_trajectories(self.env, pol.sampler_policy(params), my_tasks, cfg.n_traj, my_rng)
        batch = {k: distributed.gather_tasks(v, axis=0) for k, v in my_batch.items()}  # every task's, on every rank
        pooled = {k: v.reshape((1, -1) + v.shape[2:]) for k, v in batch.items()}
        data = trajectories(pooled, advantages(pooled, cfg.discount, cfg.gae_lambda), params["log_std"].dtype)
        params, stats = cfg.trpo().step(maml_rl.surrogate_objective(data, params), params)
        return params, state, {"return": float(batch["episode_returns"].mean()), "kl": stats["kl"],
                               "accepted": float(stats["accepted"]), "cg_residual": stats["cg_residual"]}


def train_policy(name: str, step: train.Step, params: dict, n_iterations: int, cfg: RLConfig, resume: bool = False,
                 progress: bool = True, allow_changes=()) -> train.TrainResult:
    """``train.run`` of one method, checkpointed to ``<out_dir>/<name>.ckpt.npz`` every
    ``cfg.checkpoint_every`` iterations and at the end; every iteration logged."""
    return train.run(params, step, n_iterations, seed=cfg.seed,
                     checkpoint_path=os.path.join(cfg.out_dir, f"{name}.ckpt.npz"),
                     checkpoint_every=cfg.checkpoint_every, resume=resume, config=training_settings(cfg),
                     allow_changes=allow_changes, log_every=1, progress=progress, desc=name, logger=log)


# --- evaluation --------------------------------------------------------------------------------------
def test_tasks(env, cfg: RLConfig) -> np.ndarray:
    """The fixed test tasks: ``n_test_tasks`` draws from the generator seeded with ``test_seed``."""
    return env.sample_tasks(np.random.default_rng([cfg.test_seed, 0]), cfg.n_test_tasks)


def evaluate_policy(env, params: dict, cfg: RLConfig, n_show: int = 0, inner_lr: float | None = None) -> tuple:
    """Fine-tune ``params`` on every test task with step size ``inner_lr`` (default ``cfg.inner_lr``),
    then half of it; the tasks go in chunks of ``meta_batch_size``.

    Returns ``(returns, shown)``: returns (eval_steps + 1, n_test_tasks), each task's average return
    after each step; shown: for the first ``n_show`` tasks, per step, the first trajectory's
    ``obs (n_show, H, obs_dim)`` and ``mask (n_show, H)`` (for trajectory plots). Under MPI each rank
    fine-tunes its share of every chunk and every rank gets all the results."""
    tasks = test_tasks(env, cfg)
    rng = np.random.default_rng([cfg.test_seed, 1])  # the same noise for every method
    returns, shown = [], None
    for begin in range(0, len(tasks), cfg.meta_batch_size):
        my_chunk, my_rng = rank_share(tasks[begin:begin + cfg.meta_batch_size], rng)
        first_lr = cfg.inner_lr if inner_lr is None else inner_lr
        batches = maml_rl.adaptation_batches(env, params, my_chunk, first_lr, cfg.eval_steps, my_rng,
                                             cfg.test_batch_steps, cfg.n_traj)
        returns.append(distributed.gather_tasks(np.stack([average_returns(b) for b in batches]), axis=1))
        if shown is None:
            shown = [{key: distributed.gather_tasks(b[key][:, 0], axis=0)[:n_show] for key in ("obs", "mask")}
                     for b in batches]
    return np.concatenate(returns, axis=1), shown


# --- the whole experiment ----------------------------------------------------------------------------
def check_ranks(cfg: RLConfig, ranks: int) -> None:
    """Refuse, before any work, settings that leave one of ``ranks`` MPI ranks without a task: every
    meta-batch (``meta_batch_size``) and every chunk of test tasks (``meta_batch_size`` at a time, the
    last one the rest) is split over the ranks, at least one task each."""
    distributed.check_ranks({"meta_batch_size": cfg.meta_batch_size}, ranks)
    last_chunk = cfg.n_test_tasks % cfg.meta_batch_size or cfg.meta_batch_size
    if last_chunk < ranks:
        raise ValueError(f"--n-test-tasks {cfg.n_test_tasks} in chunks of --meta-batch-size {cfg.meta_batch_size} "
                         f"leaves a last chunk of {last_chunk} test tasks for {ranks} MPI ranks: every rank needs at "
                         f"least one (use mpiexec -n {last_chunk} or fewer, or --n-test-tasks a multiple of "
                         f"{cfg.meta_batch_size})")


def run(cfg: RLConfig, resume: bool = False, progress: bool = True, n_show: int = 0, allow_changes=(),
        overwrite: bool = False) -> tuple:
    """Train the methods of ``cfg.methods``, evaluate them on the test tasks, write ``results.json``,
    ``results.md`` and the figures into ``cfg.out_dir``. Returns ``(results, shown)`` with ``shown`` the
    trajectories of the first ``n_show`` test tasks (``evaluate_policy``) per method. Under MPI every
    rank returns the same; rank 0 holds the folder and writes."""
    methods = cfg.method_list()
    check_ranks(cfg, distributed.size())
    env = build_env(cfg)
    with run_folder(cfg.out_dir, cfg.env, training_settings(cfg), resume, overwrite), guarded_arithmetic():
        return _run(cfg, env, methods, resume, progress, n_show, allow_changes)


def _run(cfg: RLConfig, env, methods, resume, progress, n_show, allow_changes) -> tuple:
    initial = init_policy(env, cfg.seed, cfg.init_output_scale)
    steps = {"maml": (MetaStep(env, cfg), cfg.maml_iterations),
             "pretrained": (PretrainStep(env, cfg), cfg.pretrain_iterations)}
    results = {"config": dataclasses.asdict(cfg), "returns": {}, "per_task": {}, "history": {},
               "train_seconds": {}, "seconds_per_iteration": {}, "eval_seconds": {}, "changes": {},
               "paper": {m: {"mean": v[0], "ci95": v[1]} for m, v in PAPER.get(cfg.env, {}).items()}}
    shown = {}
    for name in methods:
        params = initial
        if name in steps:
            step, n_iterations = steps[name]
            result = train_policy(name, step, initial, n_iterations, cfg, resume, progress, allow_changes)
            params, history = result.params, result.history
            results["history"][name] = history
            results["changes"][name] = result.changes
            results["train_seconds"][name] = result.seconds
            results["seconds_per_iteration"][name] = (float(np.median([r["seconds"] for r in history]))
                                                      if history else None)
        clock = time.perf_counter()
        per_task, shown[name] = evaluate_policy(env, params, cfg, n_show, cfg.test_lr(name))
        results["eval_seconds"][name] = time.perf_counter() - clock
        results["per_task"][name] = np.where(np.isfinite(per_task), per_task, None).tolist()
        results["returns"][name] = [summary(row) for row in per_task]
        write_json(os.path.join(cfg.out_dir, "results.json"), results)  # partial results survive a crash
    write_text(os.path.join(cfg.out_dir, "results.md"), results_markdown(results))
    if distributed.is_root():
        figures.plot_steps(results, LABELS, os.path.join(cfg.out_dir, f"{cfg.env}_steps.png"))
        figures.plot_training(results, LABELS, os.path.join(cfg.out_dir, f"{cfg.env}_training.png"))
    return results, shown


def _cells(means, cis) -> list:
    return [f"{m:.2f} ± {c:.2f}" for m, c in zip(means, cis)]


def _test_lrs(cfg: dict) -> str:
    """The test step sizes of a run's config: one number, or one per method when they differ."""
    lrs = {"MAML": cfg["inner_lr"], "pretrained": cfg["pretrained_lr"], "random init": cfg["random_lr"]}
    if len(set(lrs.values())) == 1:
        return f"{cfg['inner_lr']}"
    return ", ".join(f"{lr} {name}" for name, lr in lrs.items())


def results_markdown(results: dict) -> str:
    """Our return after 0..3 steps beside the paper's, one row per method."""
    cfg = results["config"]
    n_steps = cfg["eval_steps"]
    header = ["method", "source"] + [f"{s} step{'s' if s != 1 else ''}" for s in range(n_steps + 1)]
    rows = []
    for name in list(results["returns"]) + [m for m in ("oracle",) if m in results["paper"]]:
        if name in results["returns"]:
            ours = results["returns"][name]
            rows.append([LABELS[name], "ours", *[cell(r, digits=2) for r in ours]])
        paper = results["paper"].get(name)
        rows.append([LABELS[name], "paper",
                     *(_cells(paper["mean"], paper["ci95"])[:n_steps + 1] if paper else ["n/a"] * (n_steps + 1))])
    timing = ", ".join(f"{name} {results['history'][name][-1]['iteration'] + 1 if results['history'][name] else 0} "
                       f"iterations at {results['seconds_per_iteration'][name] or 0:.1f} s"
                       for name in results["history"])
    test_batch = cfg["test_batch_steps"]
    tested_on = (f"whole trajectories adding up to {test_batch} time steps per task and step"
                 if test_batch else f"{cfg['n_traj']} trajectories per task and step")
    return (f"### {cfg['env']} ({cfg['profile']} profile)\n\n"
            f"Average return on {cfg['n_test_tasks']} test tasks (mean ± 95% CI) after 0..{n_steps} "
            f"REINFORCE steps (alpha = {_test_lrs(cfg)}, then alpha / 2) on {tested_on}; training: meta-batch "
            f"{cfg['meta_batch_size']}, {cfg['n_traj']} trajectories per task; trained: {timing or 'nothing'}.\n\n"
            + markdown_table(header, rows) + _fragile_rows(cfg, results))


def _fragile_rows(cfg: dict, results: dict) -> str:
    """What a table says of rows that one run cannot settle: 2D navigation's pretrained baseline, fine-tuned
    with alpha 0.5 from a policy trained on pooled tasks, moves by more than its interval with the
    training seed and with the last bits of the machine's arithmetic (docs/results.md, over seeds)."""
    if cfg["env"] != "navigation" or "pretrained" not in results["returns"]:
        return ""
    return (f"\nThe pretrained baseline is training seed {cfg['seed']} alone: its returns after fine-tuning vary "
            f"with the seed and with the machine's floating-point arithmetic by more than their intervals "
            f"(docs/results.md reports them over seeds).\n")


if __name__ == "__main__":
    from .common import not_a_command
    not_a_command("minimaml.experiments.rl_common",
                  "python -m minimaml.experiments.navigation or python -m minimaml.experiments.locomotion")
