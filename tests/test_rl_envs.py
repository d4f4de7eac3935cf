"""RL environments: 2D navigation by hand; MuJoCo rewards against hand computations (optional extra)."""

import numpy as np
import pytest

from minimaml.rl import mujoco_envs as mj
from minimaml.rl.envs import Navigation2D, make_env


# --- 2D navigation -------------------------------------------------------------------------------------
def test_sample_tasks_shape_and_range():
    goals = Navigation2D().sample_tasks(np.random.default_rng(0), 1000)
    assert goals.shape == (1000, 2)
    assert goals.min() >= -0.5 and goals.max() <= 0.5
    assert goals.min() < -0.45 and goals.max() > 0.45


def test_reset_starts_at_origin():
    env = Navigation2D()
    obs = env.reset(np.array([[0.3, -0.2], [0.0, 0.1]]))
    np.testing.assert_array_equal(obs, np.zeros((2, 2)))


def test_step_clips_moves_and_rewards_by_hand():
    env = Navigation2D()
    env.reset(np.array([[0.3, -0.2], [-0.5, 0.5]]))
    obs, reward, done = env.step(np.array([[0.05, -0.5], [-2.0, 0.02]]))
    np.testing.assert_allclose(obs, [[0.05, -0.1], [-0.1, 0.02]])
    expected = -np.array([np.hypot(0.05 - 0.3, -0.1 + 0.2), np.hypot(-0.1 + 0.5, 0.02 - 0.5)])
    np.testing.assert_allclose(reward, expected)  # distance measured after the move
    assert not done.any()
    obs, _, _ = env.step(np.array([[0.1, 0.1], [0.0, 0.0]]))
    np.testing.assert_allclose(obs, [[0.15, 0.0], [-0.1, 0.02]])


def test_squared_distance_flag():
    env = Navigation2D(reward="squared_distance")
    env.reset(np.array([[0.3, 0.4]]))
    _, reward, _ = env.step(np.zeros((1, 2)))
    np.testing.assert_allclose(reward, [-0.25])
    with pytest.raises(ValueError, match="unknown reward"):
        Navigation2D(reward="l1")


def test_done_within_tolerance_then_frozen_and_zero_reward():
    env = Navigation2D()
    env.reset(np.array([[0.095, -0.005], [0.05, 0.0], [0.08, 0.0]]))
    obs, reward, done = env.step(np.array([[0.1, 0.0], [0.1, 0.0], [0.1, 0.0]]))
    # |dx| = 0.005 < 0.01 and |dy| = 0.005 < 0.01: done; the other two are 0.05 and 0.02 away in x
    np.testing.assert_array_equal(done, [True, False, False])
    np.testing.assert_allclose(reward[0], -np.hypot(0.005, 0.005))
    obs2, reward2, done2 = env.step(np.array([[0.1, 0.1], [-0.01, 0.0], [-0.02, 0.0]]))
    np.testing.assert_allclose(obs2[0], obs[0])  # frozen after done
    assert reward2[0] == 0.0 and done2[0]
    np.testing.assert_array_equal(done2, [True, False, True])  # 0.04 away still; the third is on its goal


def test_navigation_errors_name_shapes():
    env = Navigation2D()
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"goals must be \(B, 2\)"):
        env.reset(np.zeros(2))
    env.reset(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        env.step(np.zeros((2, 2)))


def test_make_env():
    assert isinstance(make_env("navigation"), Navigation2D)
    with pytest.raises(ValueError, match="unknown environment"):
        make_env("pendulum")


# --- MuJoCo: the reward functions need only NumPy; the envs need the optional extra ----------------------
def _require_mujoco():
    pytest.importorskip("mujoco")
    pytest.importorskip("gymnasium.envs.mujoco")


def test_cheetah_rewards_by_hand():
    action = np.array([[0.5, -0.5, 2.0, 0.0, 0.0, 0.0]])  # 2.0 is clipped to 1: |a|^2 = 1.5
    v = np.array([1.5])
    np.testing.assert_allclose(mj.cheetah_velocity_reward(v, action, np.array([1.0])), [-0.5 - 0.075])
    np.testing.assert_allclose(mj.cheetah_direction_reward(v, action, np.array([-1.0])), [-1.5 - 0.075])


def test_ant_rewards_and_done_by_hand():
    action = np.full((1, 8), 0.5)  # |a|^2 = 2 -> ctrl cost 0.01
    forces = np.zeros((1, 14, 6))
    forces[0, 1, :2] = [3.0, -0.5]  # clipped to [1, -0.5]: |F|^2 = 1.25 -> contact cost 0.000625
    v = np.array([2.0])
    expected_vel = -abs(2.0 - 2.5) + 1.0 - 0.01 - 0.000625 + 0.05
    np.testing.assert_allclose(mj.ant_velocity_reward(v, action, forces, np.array([2.5])), [expected_vel])
    expected_dir = -2.0 - 0.01 - 0.000625 + 0.05
    np.testing.assert_allclose(mj.ant_direction_reward(v, action, forces, np.array([-1.0])), [expected_dir])
    qpos = np.zeros((4, 15))
    qpos[:, 2] = [0.55, 0.1, 1.2, 0.55]
    qvel = np.zeros((4, 14))
    qvel[3, 0] = np.nan
    np.testing.assert_array_equal(mj.ant_done(qpos, qvel), [False, True, True, True])


def test_mujoco_task_samplers():
    rng = np.random.default_rng(0)
    vel = mj.TASKS["ant_velocity"][2](rng, 500)
    assert vel.shape == (500,) and vel.min() >= 0 and vel.max() <= 3 and vel.max() > 2.8
    assert set(mj.TASKS["cheetah_direction"][2](rng, 100)) == {-1.0, 1.0}


@pytest.mark.parametrize("task, dt", [("cheetah_velocity", 0.01), ("ant_direction", 0.02)])
def test_mujoco_vec_env_steps_with_hand_reward(task, dt):
    _require_mujoco()
    env = mj.MujocoVecEnv(task, seed=0)
    assert env.dt == pytest.approx(dt) and env.horizon == 200
    tasks = np.array([0.5, 1.0, -1.0]) if task == "ant_direction" else np.array([0.5, 1.0, 2.0])
    obs = env.reset(tasks)
    assert obs.shape == (3, env.obs_dim) and len(env._envs) == 3
    actions = np.random.default_rng(1).uniform(-1.5, 1.5, size=(3, env.act_dim))
    x_before = np.array([e.data.qpos[0] for e in env._envs])
    obs, reward, done = env.step(actions)
    velocity = (np.array([e.data.qpos[0] for e in env._envs]) - x_before) / dt
    ctrl = np.sum(np.clip(actions, -1, 1) ** 2, axis=1)
    if task == "cheetah_velocity":
        expected = -np.abs(velocity - tasks) - 0.05 * ctrl
    else:
        contact = np.array([np.sum(np.clip(e.data.cfrc_ext, -1, 1) ** 2) for e in env._envs])
        expected = tasks * velocity - 0.005 * ctrl - 0.0005 * contact + 0.05
    np.testing.assert_allclose(reward, expected)
    assert obs.shape == (3, env.obs_dim) and not done.any()


def test_ant_env_ends_when_torso_leaves_height_range():
    _require_mujoco()
    env = mj.MujocoVecEnv("ant_velocity", seed=0)
    env.reset(np.array([1.0, 1.0]))
    fallen = env._envs[1]
    qpos = fallen.data.qpos.copy()
    qpos[2] = 1.5  # torso far above the healthy range
    fallen.set_state(qpos, fallen.data.qvel.copy())
    obs, reward, done = env.step(np.zeros((2, env.act_dim)))
    np.testing.assert_array_equal(done, [False, True])
    obs2, reward2, done2 = env.step(np.zeros((2, env.act_dim)))
    assert reward2[1] == 0.0 and done2[1]
    np.testing.assert_array_equal(obs2[1], obs[1])


def test_mujoco_resets_draw_their_noise_from_the_samplers_generator():
    """The initial-state noise comes from the generator the sampler passes, not from the env's own
    stream: the same generator resets alike however many resets came before (so a locomotion
    evaluation repeats bit for bit, and a resumed run resets as the uninterrupted one)."""
    _require_mujoco()
    from minimaml.rl.sampler import sample_trajectories

    env = mj.MujocoVecEnv("cheetah_direction")
    tasks = np.array([1.0, -1.0])

    def policy(obs):
        return np.zeros(obs.shape[:2] + (env.act_dim,)), np.zeros(env.act_dim)

    first = sample_trajectories(env, policy, tasks, 2, np.random.default_rng(7), horizon=5)
    env.reset(np.zeros(4))  # resets in between used to move the env's own stream on
    again = sample_trajectories(env, policy, tasks, 2, np.random.default_rng(7), horizon=5)
    np.testing.assert_array_equal(first["obs"], again["obs"])
    other = sample_trajectories(env, policy, tasks, 2, np.random.default_rng(8), horizon=5)
    assert not np.array_equal(first["obs"][:, :, 0], other["obs"][:, :, 0])  # the noise is really drawn


def test_a_locomotion_evaluation_repeats_exactly():
    _require_mujoco()
    from minimaml.experiments import locomotion, rl_common

    cfg = locomotion.config("smoke", "cheetah_direction", n_test_tasks=2, test_batch_steps=400, eval_steps=1)
    env = rl_common.build_env(cfg)
    params = rl_common.init_policy(env, cfg.seed)
    first, _ = rl_common.evaluate_policy(env, params, cfg)
    env.reset(np.zeros(3))
    again, _ = rl_common.evaluate_policy(env, params, cfg)
    np.testing.assert_array_equal(first, again)
