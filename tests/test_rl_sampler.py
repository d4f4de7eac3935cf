"""Returns, GAE, the linear baseline, the batched sampler and its share of the tasks under MPI."""

import numpy as np
import pytest

from minimaml.rl.baseline import features, fit_linear_baseline
from minimaml.rl.envs import Navigation2D
from minimaml.rl.returns import discounted_returns, gae
from minimaml.rl.sampler import (TaskShareOfStream, advantages, average_returns, rank_share, sample_steps,
                                  sample_trajectories)


def _random_batch(rng, shape=(3, 4, 12)):
    """Random rewards, values and a mask that is 1 for a random prefix of each trajectory."""
    rewards, values = rng.normal(size=shape), rng.normal(size=shape)
    lengths = rng.integers(1, shape[-1] + 1, size=shape[:-1])
    mask = (np.arange(shape[-1]) < lengths[..., None]).astype(np.float64)
    return rewards, values, mask, lengths


def _naive_path_gae(rewards, values, discount, lam):
    """rllab's per-path computation, written as plain loops."""
    n = len(rewards)
    v = list(values) + [0.0]
    deltas = [rewards[t] + discount * v[t + 1] - v[t] for t in range(n)]
    adv = [sum((discount * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]
    ret = [sum(discount ** (k - t) * rewards[k] for k in range(t, n)) for t in range(n)]
    return np.array(adv), np.array(ret)


@pytest.mark.parametrize("lam", [1.0, 0.95, 0.0])
def test_returns_and_gae_match_naive_loops(lam):
    rng = np.random.default_rng(0)
    rewards, values, mask, lengths = _random_batch(rng)
    ret = discounted_returns(rewards, mask, 0.99)
    adv = gae(rewards, values, mask, 0.99, lam)
    for idx in np.ndindex(lengths.shape):
        n = lengths[idx]
        want_adv, want_ret = _naive_path_gae(rewards[idx][:n], values[idx][:n], 0.99, lam)
        np.testing.assert_allclose(ret[idx][:n], want_ret, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(adv[idx][:n], want_adv, rtol=1e-10, atol=1e-12)
        assert not ret[idx][n:].any() and not adv[idx][n:].any()


def test_gae_lambda_one_is_return_minus_value():
    rng = np.random.default_rng(1)
    rewards, values, mask, _ = _random_batch(rng)
    expected = (discounted_returns(rewards, mask, 0.9) - values) * mask
    np.testing.assert_allclose(gae(rewards, values, mask, 0.9, 1.0), expected)


def test_returns_shape_errors():
    with pytest.raises(ValueError, match="must share a shape"):
        discounted_returns(np.zeros((2, 5)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="values"):
        gae(np.zeros((2, 5)), np.zeros((2, 4)), np.zeros((2, 5)))


def test_features_layout():
    obs = np.array([[[1.0, -20.0], [2.0, 3.0]]])  # (1, H=2, 2)
    phi = features(obs)
    np.testing.assert_allclose(phi[0, 0], [1, -10, 1, 100, 0, 0, 0, 1])  # obs clipped to [-10, 10]
    np.testing.assert_allclose(phi[0, 1], [2, 3, 4, 9, 0.01, 1e-4, 1e-6, 1])


def test_baseline_recovers_linear_target_per_task_and_ignores_masked_steps():
    rng = np.random.default_rng(0)
    T, B, H, D = 3, 5, 20, 2
    obs = rng.uniform(-1, 1, size=(T, B, H, D))
    coeffs = rng.normal(size=(T, 2 * D + 4))  # a different linear target for each task
    target = np.einsum("tbhf,tf->tbh", features(obs), coeffs)
    mask = np.ones((T, B, H))
    mask[:, 0, 15:] = 0
    returns = np.where(mask > 0, target, 1e3)  # garbage on masked steps must not matter
    values = fit_linear_baseline(obs, returns, mask)
    np.testing.assert_allclose(values, target * mask, atol=1e-3)
    # per-task fits are independent: changing task 2's data leaves tasks 0 and 1 unchanged
    returns2 = returns.copy()
    returns2[2] += rng.normal(size=(B, H))
    values2 = fit_linear_baseline(obs, returns2, mask)
    np.testing.assert_array_equal(values2[:2], values[:2])
    assert not np.allclose(values2[2], values[2])


def test_baseline_shape_errors():
    with pytest.raises(ValueError, match=r"obs \(T, B, H, obs_dim\)"):
        fit_linear_baseline(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), np.ones((2, 3, 4)))


def _goal_seeking_policy(goals, log_std=-30.0):
    """mean = goal - position (the env clips it to the fastest straight move), nearly deterministic."""
    return lambda obs: (goals[:, None, :] - obs, np.full(2, log_std, dtype=np.float32))


def test_sampler_shapes_mask_and_reproducibility():
    env = Navigation2D()
    goals = env.sample_tasks(np.random.default_rng(0), 4)
    policy = _goal_seeking_policy(goals.astype(np.float32), log_std=-1.0)
    a = sample_trajectories(env, policy, goals, 3, np.random.default_rng(7))
    b = sample_trajectories(env, policy, goals, 3, np.random.default_rng(7))
    assert a["obs"].shape == (4, 3, 100, 2) and a["actions"].shape == (4, 3, 100, 2)
    assert a["rewards"].shape == a["mask"].shape == (4, 3, 100) and a["episode_returns"].shape == (4, 3)
    assert a["obs"].dtype == np.float32
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = sample_trajectories(env, policy, goals, 3, np.random.default_rng(8))
    assert not np.array_equal(a["actions"], c["actions"])
    np.testing.assert_allclose(a["episode_returns"], a["rewards"].sum(-1), rtol=1e-6)
    np.testing.assert_array_equal(a["obs"][:, :, 0], 0)  # everyone starts at the origin
    assert (np.diff(a["mask"], axis=-1) <= 0).all()  # once done, always done


def test_goal_seeking_policy_is_near_optimal():
    env = Navigation2D()
    goals = np.array([[0.35, -0.2], [0.0, 0.0], [-0.5, 0.5]])
    policy = _goal_seeking_policy(goals.astype(np.float32))
    batch = sample_trajectories(env, policy, goals, 2, np.random.default_rng(0))
    # optimal by hand: move each coordinate by min(0.1, remaining) until both are within 0.01
    for goal, returns, mask in zip(goals, batch["episode_returns"], batch["mask"]):
        pos, best, steps = np.zeros(2), 0.0, 0
        while True:
            pos = pos + np.clip(goal - pos, -0.1, 0.1)
            best, steps = best - np.linalg.norm(pos - goal), steps + 1
            if np.all(np.abs(pos - goal) < 0.01):
                break
        np.testing.assert_allclose(returns, best, atol=1e-4)
        np.testing.assert_array_equal(mask.sum(-1), steps)
    random_policy = _goal_seeking_policy(np.zeros((3, 2), np.float32), log_std=0.0)  # N(-obs, 1)
    random = sample_trajectories(env, random_policy, goals, 2, np.random.default_rng(0))
    assert batch["episode_returns"].mean() > random["episode_returns"].mean() + 10


def test_sample_steps_keeps_whole_trajectories_up_to_the_budget():
    """rllab's batch_size: a task keeps trajectories while its earlier ones have fewer than min_steps steps.
    Goal 0 is reached in a few steps (short episodes: several rounds), goal 1 never (full-length ones)."""
    env = Navigation2D()
    goals = np.array([[0.2, 0.1], [0.45, -0.45]])
    policy = _goal_seeking_policy(np.array([[0.2, 0.1], [0.0, 0.0]], np.float32), log_std=-8.0)
    batch = sample_steps(env, policy, goals, 250, np.random.default_rng(0))
    lengths = batch["mask"].sum(-1)
    all_lengths = np.where(batch["kept"], lengths, -1)
    for task in range(2):
        kept = batch["kept"][task]
        assert kept[:kept.sum()].all() and not kept[kept.sum():].any()  # a prefix of the draws
        steps = lengths[task][kept]
        assert steps.sum() >= 250 and steps[:-1].sum() < 250
    assert (all_lengths[0][batch["kept"][0]] == 2).all() and batch["kept"][0].sum() == 125
    assert batch["kept"][1].sum() == 3 and (lengths[1][:3] == 100).all()
    assert batch["kept"].shape[1] % 3 == 0  # rounds of ceil(250 / 100) trajectories
    assert not batch["mask"][~batch["kept"]].any() and not batch["rewards"][~batch["kept"]].any()
    full = batch["rewards"].sum(-1)
    np.testing.assert_allclose(average_returns(batch), [full[t][batch["kept"][t]].mean() for t in range(2)])
    with pytest.raises(ValueError, match="min_steps"):
        sample_steps(env, policy, goals, 0, np.random.default_rng(0))


def test_sampler_accepts_per_task_log_std_and_checks_shapes():
    env = Navigation2D()
    goals = np.zeros((2, 2))
    per_task = lambda obs: (np.zeros_like(obs), np.array([[-50.0, -50.0], [0.0, 0.0]], np.float32))
    batch = sample_trajectories(env, per_task, goals, 2, np.random.default_rng(0), horizon=5)
    assert np.abs(batch["actions"][0]).max() < 1e-10 and np.abs(batch["actions"][1]).max() > 0.01
    bad = lambda obs: (np.zeros(obs.shape[:-1] + (3,)), np.zeros(3))
    with pytest.raises(ValueError, match="policy must return mean"):
        sample_trajectories(env, bad, goals, 2, np.random.default_rng(0), horizon=5)
    with pytest.raises(ValueError, match="tasks must be"):
        sample_trajectories(env, per_task, np.zeros(2), 2, np.random.default_rng(0), horizon=5)


def test_advantages_centred_per_task_and_masked():
    env = Navigation2D()
    goals = env.sample_tasks(np.random.default_rng(0), 3)
    policy = _goal_seeking_policy(goals.astype(np.float32), log_std=0.0)
    batch = sample_trajectories(env, policy, goals, 4, np.random.default_rng(1))
    batch["mask"][0, 0, 50:] = 0  # pretend one trajectory ended early
    adv = advantages(batch)
    mask = batch["mask"]
    assert adv.shape == (3, 4, 100) and adv.dtype == np.float32
    assert not adv[mask == 0].any()
    count = mask.sum(axis=(1, 2))
    np.testing.assert_allclose(adv.sum(axis=(1, 2)) / count, 0, atol=1e-5)
    np.testing.assert_allclose(np.sqrt((adv**2).sum(axis=(1, 2)) / count), 1, atol=1e-4)
    raw = advantages(batch, center=False)
    returns = discounted_returns(batch["rewards"], mask)
    values = fit_linear_baseline(batch["obs"], returns, mask)
    np.testing.assert_allclose(raw, (returns - values) * mask, rtol=1e-5, atol=1e-5)


# --- a rank's share of the tasks (minimaml.distributed) ----------------------------------------------
def test_task_share_of_stream_draws_one_process_numbers_and_keeps_the_shares_rows():
    """Tasks 1..2 of 5: each draw is the share's rows of the draw one process makes for all 5 tasks
    (noise (T, B, act_dim), reset seeds (T * B,)), and the generator goes on as one process's."""
    whole, shared = np.random.default_rng(3), np.random.default_rng(3)
    stream = TaskShareOfStream(shared, slice(1, 3), 5)
    np.testing.assert_array_equal(stream.standard_normal((2, 4, 6)), whole.standard_normal((5, 4, 6))[1:3])
    np.testing.assert_array_equal(stream.integers(0, 2**31 - 1, size=2 * 4),
                                  whole.integers(0, 2**31 - 1, size=5 * 4)[4:12])
    np.testing.assert_array_equal(shared.standard_normal(3), whole.standard_normal(3))
    with pytest.raises(ValueError, match="same number of rows"):
        stream.standard_normal((3, 4))
    with pytest.raises(ValueError, match="non-empty slice of 5 tasks"):
        TaskShareOfStream(shared, slice(4, 6), 5)


def test_one_process_samples_all_the_tasks_from_its_own_generator():
    tasks, rng = np.zeros((4, 2)), np.random.default_rng(0)
    mine, my_rng = rank_share(tasks, rng)
    assert mine is tasks and my_rng is rng


def test_a_share_samples_the_rows_one_process_samples():
    """A per-task policy (each task's actions depend on its rows only) on tasks 1..3 of 5, through the
    share's stream: bit for bit the rows of one process's batch of all 5 tasks."""
    env = Navigation2D()
    goals = env.sample_tasks(np.random.default_rng(0), 5)
    whole = sample_trajectories(env, _goal_seeking_policy(goals.astype(np.float32), log_std=0.0), goals, 3,
                                np.random.default_rng(4), horizon=20)
    part = slice(1, 4)
    share = sample_trajectories(env, _goal_seeking_policy(goals[part].astype(np.float32), log_std=0.0), goals[part],
                                3, TaskShareOfStream(np.random.default_rng(4), part, 5), horizon=20)
    for key in whole:
        np.testing.assert_array_equal(share[key], whole[key][part], err_msg=key)


def test_a_share_of_mujoco_tasks_resets_and_samples_as_one_process():
    """The half-cheetah draws its reset seeds (``integers``) through the share's stream too."""
    pytest.importorskip("mujoco")
    pytest.importorskip("gymnasium")
    from minimaml.rl.mujoco_envs import MujocoVecEnv

    env = MujocoVecEnv("cheetah_direction")
    tasks = env.sample_tasks(np.random.default_rng(0), 3)

    def policy(obs):  # per task: each row's mean from its own observation
        return 0.1 * obs[..., :env.act_dim], np.zeros(env.act_dim, np.float32)

    whole = sample_trajectories(env, policy, tasks, 2, np.random.default_rng(5), horizon=4)
    share = sample_trajectories(env, policy, tasks[2:], 2, TaskShareOfStream(np.random.default_rng(5), slice(2, 3), 3),
                                horizon=4)
    for key in whole:
        np.testing.assert_array_equal(share[key], whole[key][2:], err_msg=key)
