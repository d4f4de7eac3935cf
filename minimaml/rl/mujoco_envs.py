"""MuJoCo locomotion tasks of Finn et al. (2017, Sec. 5.3), on gymnasium's v5 models (optional extra).

The physics and observations are gymnasium's ``HalfCheetah-v5`` / ``Ant-v5``; the rewards are the
paper's, computed here by small pure functions from the torso's x-velocity
``v = (x_{t+1} - x_t) / dt`` and the action ``a`` clipped to the action box [-1, 1]:

    cheetah velocity   r = -|v - goal| - 0.05 |a|^2                                goal ~ U[0, 2]
    cheetah direction  r = dir * v - 0.05 |a|^2                                    dir ~ {-1, +1}
    ant velocity       r = -|v - goal| + 1 - 0.005 |a|^2 - 0.0005 |clip(F)|^2 + 0.05  goal ~ U[0, 3]
    ant direction      r = dir * v        - 0.005 |a|^2 - 0.0005 |clip(F)|^2 + 0.05  dir ~ {-1, +1}

as in the authors' rllab ``half_cheetah_env_rand*.py`` and ``ant_env_rand*.py`` (cbfinn/maml_rl):
cheetah ctrl cost 0.1 * 0.5 |a|^2; ant ctrl cost 0.5e-2 |a / 150|^2 on rllab's torque range [-150, 150]
(= 0.005 |a|^2 on gymnasium's [-1, 1] with gear 150), contact cost 0.5e-3 |clip(cfrc_ext, -1, 1)|^2
summed over all bodies, survival bonus 0.05, and +1 in the ant velocity reward ("make it happy, not
suicidal"). The ant episode ends when its state is not finite or the torso height leaves [0.2, 1.0];
the cheetah never ends early. Horizon 200 for all four.

Control time step as in rllab's models: half-cheetah 0.01 s (gymnasium's timestep 0.01, frame_skip 1),
ant 0.02 s (gymnasium's timestep 0.01, frame_skip 2; rllab used one RK4 step of 0.02). Differences that
remain: rllab measured v as the torso's centre-of-mass velocity rather than the position difference, its
observations added the torso's centre of mass (and the torso frame for the ant), and its initial state
noise was N(0, 0.01) on qpos; here the observation and the reset noise are gymnasium's defaults.
"""

from __future__ import annotations

import warnings

import numpy as np

HORIZON = 200
CHEETAH_CTRL_WEIGHT = 0.05
ANT_CTRL_WEIGHT = 0.005
ANT_CONTACT_WEIGHT = 0.0005
ANT_SURVIVE_BONUS = 0.05
ANT_HEALTHY_Z = (0.2, 1.0)


def _import_extra():
    """(gymnasium, mujoco), or an ImportError that says how to install them."""
    try:
        import mujoco
        import gymnasium
        import gymnasium.envs.mujoco  # noqa: F401  (needs imageio too: fail here, clearly)
    except ImportError as err:
        raise ImportError(
            f"minimaml.rl.mujoco_envs needs the optional MuJoCo extra ({err}): install it with "
            "`pip install -e '.[mujoco]'` (gymnasium's MuJoCo envs also need `imageio`)"
        ) from err
    return gymnasium, mujoco


# --- rewards: pure functions over a leading batch axis ---------------------------------------------
def _ctrl_cost(action, weight):
    """weight * |clip(a, -1, 1)|^2 summed over the last axis: (B, act_dim) -> (B,)."""
    return weight * np.sum(np.square(np.clip(action, -1.0, 1.0)), axis=-1)


def _contact_cost(contact_forces):
    """0.0005 * |clip(F, -1, 1)|^2 over all bodies: (B, n_body, 6) -> (B,)."""
    forces = np.clip(contact_forces, -1.0, 1.0)
    return ANT_CONTACT_WEIGHT * np.sum(np.square(forces).reshape(len(forces), -1), axis=-1)


def cheetah_velocity_reward(x_velocity, action, goal_velocity):
    """r = -|v - goal| - 0.05 |a|^2. v, goal: (B,), action: (B, 6) -> (B,)."""
    return -np.abs(x_velocity - goal_velocity) - _ctrl_cost(action, CHEETAH_CTRL_WEIGHT)


def cheetah_direction_reward(x_velocity, action, direction):
    """r = dir * v - 0.05 |a|^2. v, dir: (B,), action: (B, 6) -> (B,)."""
    return direction * x_velocity - _ctrl_cost(action, CHEETAH_CTRL_WEIGHT)


def ant_velocity_reward(x_velocity, action, contact_forces, goal_velocity):
    """r = -|v - goal| + 1 - 0.005 |a|^2 - 0.0005 |clip(F)|^2 + 0.05. action: (B, 8), F: (B, n_body, 6)."""
    forward = -np.abs(x_velocity - goal_velocity) + 1.0
    return forward - _ctrl_cost(action, ANT_CTRL_WEIGHT) - _contact_cost(contact_forces) + ANT_SURVIVE_BONUS


def ant_direction_reward(x_velocity, action, contact_forces, direction):
    """r = dir * v - 0.005 |a|^2 - 0.0005 |clip(F)|^2 + 0.05. action: (B, 8), F: (B, n_body, 6)."""
    forward = direction * x_velocity
    return forward - _ctrl_cost(action, ANT_CTRL_WEIGHT) - _contact_cost(contact_forces) + ANT_SURVIVE_BONUS


def ant_done(qpos, qvel):
    """True where the state is not finite or the torso height qpos[:, 2] leaves [0.2, 1.0]: (B,)."""
    finite = np.isfinite(qpos).all(axis=-1) & np.isfinite(qvel).all(axis=-1)
    low, high = ANT_HEALTHY_Z
    return ~(finite & (qpos[:, 2] >= low) & (qpos[:, 2] <= high))


# --- task samplers -----------------------------------------------------------------------------------
def _uniform(high):
    return lambda rng, n: rng.uniform(0.0, high, size=n)


def _direction(rng, n):
    return rng.choice(np.array([-1.0, 1.0]), size=n)


# name: (gymnasium id, frame_skip, task sampler, reward, uses contact forces)
TASKS = {
    "cheetah_velocity": ("HalfCheetah-v5", 1, _uniform(2.0), cheetah_velocity_reward, False),
    "cheetah_direction": ("HalfCheetah-v5", 1, _direction, cheetah_direction_reward, False),
    "ant_velocity": ("Ant-v5", 2, _uniform(3.0), ant_velocity_reward, True),
    "ant_direction": ("Ant-v5", 2, _direction, ant_direction_reward, True),
}


class MujocoVecEnv:
    """B gymnasium MuJoCo envs stepped together, with the paper's task rewards.

    ``reset(tasks (B,))`` sets env i's goal velocity (or direction) to ``tasks[i]``, growing the pool of
    envs as needed; ``step(actions (B, act_dim)) -> obs (B, obs_dim), reward (B,), done (B,)``. Finished
    envs are not stepped again: they keep their last observation, reward 0 and done True. Initial-state
    noise comes from the generator passed to ``reset`` (the sampler passes the run's own, so that a
    resumed run and a repeated evaluation reset alike), else from one seeded with ``seed``.
    """

    horizon = HORIZON
    task_shape = ()

    def __init__(self, task: str, seed: int = 0):
        if task not in TASKS:
            raise ValueError(f"MujocoVecEnv: unknown task {task!r}; expected one of {tuple(TASKS)}")
        self._gymnasium, self._mujoco = _import_extra()
        self.task = task
        self.env_id, self.frame_skip, self._sample, self._reward, self._uses_contacts = TASKS[task]
        self._rng = np.random.default_rng(seed)
        self._envs = []
        self._add_envs(1)
        first = self._envs[0]
        self.dt = first.dt
        self.obs_dim = first.observation_space.shape[0]
        self.act_dim = first.action_space.shape[0]
        self.tasks = self.obs = self.done = None

    def _add_envs(self, n):
        """Grow the pool by n envs; MuJoCo's model warnings become Python warnings, not MUJOCO_LOG.TXT."""
        if n <= 0:
            return
        previous = self._mujoco.get_mju_user_warning()
        self._mujoco.set_mju_user_warning(lambda message: warnings.warn(f"MuJoCo ({self.env_id}): {message}"))
        try:
            for _ in range(n):
                self._envs.append(self._gymnasium.make(self.env_id, frame_skip=self.frame_skip).unwrapped)
        finally:
            self._mujoco.set_mju_user_warning(previous)

    def sample_tasks(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n goal velocities (U[0, 2] cheetah, U[0, 3] ant) or directions (+-1): (n,)."""
        return self._sample(rng, n)

    def reset(self, tasks, rng: np.random.Generator | None = None) -> np.ndarray:
        """tasks (B,) -> obs (B, obs_dim); each env reset with fresh initial-state noise drawn from ``rng``
        (default: the env's own generator)."""
        tasks = np.asarray(tasks, dtype=np.float64)
        if tasks.ndim != 1:
            raise ValueError(f"MujocoVecEnv.reset ({self.task}): tasks must be (B,), got shape {tasks.shape}")
        self._add_envs(len(tasks) - len(self._envs))
        seeds = (self._rng if rng is None else rng).integers(0, 2**31 - 1, size=len(tasks))
        self.tasks = tasks
        self.obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(self._envs, seeds)])
        self.done = np.zeros(len(tasks), dtype=bool)
        return self.obs.copy()

    def step(self, actions):
        """actions (B, act_dim) -> obs (B, obs_dim), reward (B,), done (B,)."""
        if self.obs is None:
            raise RuntimeError(f"MujocoVecEnv.step ({self.task}) called before reset")
        actions = np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0)
        if actions.shape != (len(self.tasks), self.act_dim):
            raise ValueError(
                f"MujocoVecEnv.step ({self.task}): actions must be {(len(self.tasks), self.act_dim)}, "
                f"got {actions.shape}"
            )
        reward = np.zeros(len(self.tasks))
        alive = np.flatnonzero(~self.done)
        if len(alive) == 0:
            return self.obs.copy(), reward, self.done.copy()
        envs = [self._envs[i] for i in alive]
        x_before = np.array([env.data.qpos[0] for env in envs])
        for i, env in zip(alive, envs):
            self.obs[i] = env.step(actions[i])[0]
        x_after = np.array([env.data.qpos[0] for env in envs])
        velocity = (x_after - x_before) / self.dt
        if self._uses_contacts:
            forces = np.stack([env.data.cfrc_ext for env in envs])
            reward[alive] = self._reward(velocity, actions[alive], forces, self.tasks[alive])
            qpos = np.stack([env.data.qpos for env in envs])
            qvel = np.stack([env.data.qvel for env in envs])
            self.done[alive] = ant_done(qpos, qvel)
        else:
            reward[alive] = self._reward(velocity, actions[alive], self.tasks[alive])
        return self.obs.copy(), reward, self.done.copy()
