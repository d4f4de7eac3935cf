"""2D navigation (Finn et al. 2017, Sec. 5.3), vectorised over B environments at once.

A point agent starts at the origin and must move to a goal ``g ~ U[-0.5, 0.5]^2`` (one goal per task).
Each step, as in the authors' ``point_env_randgoal.py`` (cbfinn/maml_rl):

    a_t     = clip(action_t, -0.1, 0.1)                 per coordinate
    s_{t+1} = s_t + a_t
    r_t     = -||s_{t+1} - g||_2                        (the code; the paper writes the squared distance)
    done_t  = |s_{t+1} - g|_x < 0.01 and |s_{t+1} - g|_y < 0.01

The observation is the position. Once an environment is done it stays frozen: its position no longer
changes, its reward is 0 and ``done`` stays True, so the step that reached the goal is the last that counts
(rllab's rollout keeps that step's reward, then stops the path).

``make_env(name)`` builds any of the RL environments by name (the MuJoCo ones need the optional extra).
"""

from __future__ import annotations

import numpy as np

REWARDS = ("distance", "squared_distance")


class Navigation2D:
    """B point agents in the plane, each with its own goal; all stepped together.

    reward: ``"distance"`` (the authors' code, default) or ``"squared_distance"`` (the paper's text).
    """

    obs_dim = 2
    act_dim = 2
    task_shape = (2,)
    horizon = 100
    max_action = 0.1
    goal_range = (-0.5, 0.5)
    goal_tolerance = 0.01

    def __init__(self, reward: str = "distance"):
        if reward not in REWARDS:
            raise ValueError(f"Navigation2D: unknown reward {reward!r}; expected one of {REWARDS}")
        self.reward = reward
        self.goals = None  # (B, 2)
        self.position = None  # (B, 2)
        self.done = None  # (B,) bool

    def sample_tasks(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n goals ``~ U[-0.5, 0.5]^2``: (n, 2)."""
        return rng.uniform(*self.goal_range, size=(n, 2))

    def reset(self, goals, rng: np.random.Generator | None = None) -> np.ndarray:
        """Start B agents at the origin, agent i heading for ``goals[i]``: goals (B, 2) -> obs (B, 2).
        The start has no noise, so ``rng`` (the sampler's) is not drawn from."""
        goals = np.asarray(goals, dtype=np.float64)
        if goals.ndim != 2 or goals.shape[1] != 2:
            raise ValueError(f"Navigation2D.reset: goals must be (B, 2), got shape {goals.shape}")
        self.goals = goals.copy()
        self.position = np.zeros_like(self.goals)
        self.done = np.zeros(len(goals), dtype=bool)
        return self.position.copy()

    def step(self, actions):
        """actions (B, 2) -> obs (B, 2), reward (B,), done (B,); finished agents get reward 0."""
        if self.position is None:
            raise RuntimeError("Navigation2D.step called before reset")
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape != self.position.shape:
            raise ValueError(f"Navigation2D.step: actions must be {self.position.shape}, got {actions.shape}")
        alive = ~self.done
        move = np.clip(actions, -self.max_action, self.max_action)
        self.position = self.position + alive[:, None] * move
        offset = self.position - self.goals
        distance = np.linalg.norm(offset, axis=1)
        cost = distance if self.reward == "distance" else distance**2
        reward = np.where(alive, -cost, 0.0)
        self.done = self.done | np.all(np.abs(offset) < self.goal_tolerance, axis=1)
        return self.position.copy(), reward, self.done.copy()


def make_env(name: str, **kwargs):
    """An RL environment by name: ``"navigation"`` or a MuJoCo task of ``mujoco_envs.TASKS``."""
    if name == "navigation":
        return Navigation2D(**kwargs)
    from minimaml.rl import mujoco_envs

    if name in mujoco_envs.TASKS:
        return mujoco_envs.MujocoVecEnv(name, **kwargs)
    expected = ("navigation",) + tuple(mujoco_envs.TASKS)
    raise ValueError(f"make_env: unknown environment {name!r}; expected one of {expected}")
