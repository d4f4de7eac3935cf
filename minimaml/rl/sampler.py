"""Batched rollouts: T tasks x B trajectories stepped together, the policy called once per time step.

Environment i = t * B + b runs trajectory b of task t. ``sample_steps`` draws whole trajectories until
each task has a budget of time steps, as the authors' test scripts (rllab's ``batch_size``). Actions are
Gaussian,

    a = mean(obs) + exp(log_std) * eps,    eps ~ N(0, I) from a seeded numpy Generator,

and are stored as sampled (the environment clips them), so their log-probabilities can be recomputed.
``advantages`` turns a batch into the REINFORCE inner step's advantages: GAE with a linear baseline
fitted per task, optionally centred per task.

Under MPI (``minimaml.distributed``) each rank rolls out its share of the tasks (``rank_share``) and
draws through ``TaskShareOfStream``: every draw is made at the size one process makes it for all T
tasks and the rank keeps its rows, so the noise of every trajectory is one process's, whatever the
number of ranks R. The early stops (every episode over; every task's budget met) are decided over all
the ranks, so every rank draws as many times as one process does. The trajectories are then one
process's up to the last bits of the shared policy's matrix products, which BLAS rounds differently
in calls with fewer rows (a task-axis policy, one matrix product per task, gives the same bits).
"""

from __future__ import annotations

import numpy as np

from minimaml import distributed
from minimaml.backend import to_numpy
from minimaml.rl.baseline import fit_linear_baseline
from minimaml.rl.returns import discounted_returns, gae


class TaskShareOfStream:
    """The draws of one rank's share of the tasks, ``part`` of ``n_tasks``, from the generator ``rng``
    that one process samples all the tasks from.

    The sampler and the envs draw arrays whose leading axis runs over the tasks, each task's rows
    together: the action noise ``(T, B, act_dim)``, MuJoCo's reset seeds ``(T * B,)`` (the tasks repeated
    B times). Asked for ``(T_r * k, ...)`` numbers, with T_r the share's tasks, this draws
    ``(n_tasks * k, ...)`` from ``rng``, what one process draws, and returns rows
    ``part.start * k .. part.stop * k``: the share's own. Only the draws the sampler and the envs make
    are here (``standard_normal``, ``integers``)."""

    def __init__(self, rng: np.random.Generator, part: slice, n_tasks: int):
        if not 0 <= part.start < part.stop <= n_tasks:
            raise ValueError(f"TaskShareOfStream: part {part} must be a non-empty slice of {n_tasks} tasks")
        self.rng, self.part, self.n_tasks = rng, part, n_tasks

    def _whole(self, size) -> tuple:
        """(the shape one process draws, the rows this share keeps) for a draw of ``size`` here."""
        shape = tuple(np.atleast_1d(size))
        mine = self.part.stop - self.part.start
        per_task, rest = divmod(shape[0], mine)
        if rest:
            raise ValueError(f"TaskShareOfStream: a draw of shape {shape} does not have the same number of "
                             f"rows for each of this share's {mine} tasks")
        return (per_task * self.n_tasks,) + shape[1:], slice(self.part.start * per_task, self.part.stop * per_task)

    def standard_normal(self, size):
        shape, rows = self._whole(size)
        return self.rng.standard_normal(shape)[rows]

    def integers(self, low, high, size):
        shape, rows = self._whole(size)
        return self.rng.integers(low, high, size=shape)[rows]


def rank_share(tasks, rng: np.random.Generator) -> tuple:
    """(this rank's share of ``tasks`` (``distributed.share``), the generator its sampling draws from):
    ``(tasks, rng)`` themselves in one process; under MPI the share's rows and a ``TaskShareOfStream``
    of ``rng``. ``tasks``: the whole batch, the same on every rank."""
    if distributed.size() == 1:
        return tasks, rng
    part = distributed.share(len(tasks))
    return tasks[part], TaskShareOfStream(rng, part, len(tasks))


def sample_trajectories(env, policy, tasks, n_traj: int, rng: np.random.Generator, horizon: int | None = None):
    """Roll out ``n_traj`` trajectories of each task with ``policy``.

    env: a vectorised env (``reset(tasks (N, ...), rng) -> obs (N, obs_dim)``, drawing any initial-state
    noise from ``rng``; ``step(actions (N, act_dim))
    -> obs, reward (N,), done (N,)``); policy: ``obs (T, B, obs_dim) float32 -> (mean (T, B, act_dim),
    log_std (act_dim,) or (T, act_dim))``, NumPy or CuPy; tasks: (T, ...) from ``env.sample_tasks``
    (under MPI this rank's share, and ``rng`` its ``TaskShareOfStream``: ``rank_share``). The rollout
    stops early once every episode of every rank has ended.

    Returns a dict of NumPy arrays: ``obs (T, B, H, obs_dim)``, ``actions (T, B, H, act_dim)``,
    ``rewards (T, B, H)``, ``mask (T, B, H)`` (1 while the episode is alive; float32),
    ``episode_returns (T, B)``, the undiscounted sum of rewards, and ``kept (T, B)``, all True here
    (``sample_steps`` drops trajectories past a budget).
    """
    tasks = np.asarray(tasks)
    n_tasks, horizon = len(tasks), horizon or env.horizon
    if tasks.shape[1:] != tuple(env.task_shape):
        raise ValueError(f"sample_trajectories: tasks must be (T,) + {tuple(env.task_shape)}, got {tasks.shape}")
    shape = (n_tasks, n_traj)
    obs_dim, act_dim = env.obs_dim, env.act_dim
    out = {
        "obs": np.zeros(shape + (horizon, obs_dim), dtype=np.float32),
        "actions": np.zeros(shape + (horizon, act_dim), dtype=np.float32),
        "rewards": np.zeros(shape + (horizon,), dtype=np.float32),
        "mask": np.zeros(shape + (horizon,), dtype=np.float32),
    }
    obs = env.reset(np.repeat(tasks, n_traj, axis=0), rng).reshape(shape + (obs_dim,)).astype(np.float32)
    alive = np.ones(shape, dtype=bool)
    for h in range(horizon):
        mean, log_std = policy(obs)
        mean, std = to_numpy(mean), np.exp(to_numpy(log_std))
        if mean.shape != shape + (act_dim,) or std.shape not in ((act_dim,), (n_tasks, act_dim)):
            raise ValueError(
                f"sample_trajectories: policy must return mean {shape + (act_dim,)} and log_std ({act_dim},) "
                f"or ({n_tasks}, {act_dim}); got mean {mean.shape}, log_std {std.shape}"
            )
        if std.ndim == 2:
            std = std[:, None, :]
        actions = mean + std * rng.standard_normal(mean.shape)
        out["obs"][:, :, h] = obs
        out["actions"][:, :, h] = actions
        out["mask"][:, :, h] = alive
        next_obs, reward, done = env.step(actions.reshape(-1, act_dim))
        out["rewards"][:, :, h] = reward.reshape(shape) * alive
        alive &= ~done.reshape(shape)
        if not distributed.any_over_ranks(alive.any()):  # every rank stops at the same step
            break
        obs = next_obs.reshape(shape + (obs_dim,)).astype(np.float32)
    out["episode_returns"] = out["rewards"].sum(axis=-1, dtype=np.float64)
    out["kept"] = np.ones(shape, dtype=bool)
    return out


def sample_steps(env, policy, tasks, min_steps: int, rng: np.random.Generator, horizon: int | None = None):
    """Whole trajectories of each task until their lengths add up to at least ``min_steps`` time steps:
    rllab's ``batch_size``, which the authors' test scripts set to 4000 (2D navigation: 40 trajectories
    of 100 steps if none ends early, more when episodes end at the goal).

    All tasks are rolled out together, in rounds of ``ceil(min_steps / horizon)`` trajectories per task,
    until every task (of every rank, under MPI) has its budget. Task t keeps trajectory b iff its
    trajectories before b have fewer than ``min_steps`` steps in all; the others get ``kept`` False and
    mask 0, so losses, baselines and ``average_returns`` ignore them. Returns a dict like
    ``sample_trajectories``, B = all trajectories drawn for each task.
    """
    horizon = horizon or env.horizon
    if min_steps < 1:
        raise ValueError(f"sample_steps: min_steps must be positive, got {min_steps}")
    per_round = -(-min_steps // horizon)
    rounds = []
    while True:
        rounds.append(sample_trajectories(env, policy, tasks, per_round, rng, horizon))
        lengths = np.concatenate([r["mask"].sum(axis=-1) for r in rounds], axis=1)  # (T, B so far)
        if distributed.all_over_ranks((lengths.sum(axis=1) >= min_steps).all()):
            break
    out = {k: np.concatenate([r[k] for r in rounds], axis=1) for k in rounds[0]}
    steps_before = np.cumsum(lengths, axis=1) - lengths
    out["kept"] = steps_before < min_steps
    out["mask"] = out["mask"] * out["kept"][..., None]
    out["rewards"] = out["rewards"] * out["kept"][..., None]
    out["episode_returns"] = np.where(out["kept"], out["episode_returns"], 0.0)
    return out


def average_returns(batch) -> np.ndarray:
    """Each task's average undiscounted return over its kept trajectories: (T,)."""
    kept = batch["kept"]
    return (batch["episode_returns"] * kept).sum(axis=1) / kept.sum(axis=1)


def advantages(
    batch, discount: float = 0.99, gae_lambda: float = 1.0, center: bool = True, reg_coeff: float = 1e-5
):
    """Advantages for the policy gradient: GAE against a linear baseline fitted to each task's returns.

        R = discounted_returns(rewards),  V = linear baseline fitted per task to R,  A = GAE(rewards, V)
        centred (if ``center``): A <- (A - mean_i) / (std_i + 1e-8) over task i's valid steps

    batch: a dict from ``sample_trajectories`` -> advantages (T, B, H) float32, 0 on masked steps.
    """
    rewards, mask = batch["rewards"], batch["mask"]
    returns = discounted_returns(rewards, mask, discount)
    values = fit_linear_baseline(batch["obs"], returns, mask, reg_coeff)
    adv = gae(rewards, values, mask, discount, gae_lambda)
    if center:
        count = mask.sum(axis=(1, 2), keepdims=True)
        mean = adv.sum(axis=(1, 2), keepdims=True) / count
        std = np.sqrt((np.square(adv - mean) * mask).sum(axis=(1, 2), keepdims=True) / count)
        adv = (adv - mean) / (std + 1e-8) * mask
    return adv.astype(np.float32)
