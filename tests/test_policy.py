"""Gaussian MLP policy: initialisation, batched (per-task) application, log-probabilities and KL."""

import math

import numpy as np
import pytest

from minimaml import autodiff as ad
from minimaml.nn import mlp
from minimaml.nn import policy as pol

OBS_DIM, ACT_DIM, HIDDEN = 3, 2, (8, 8)


def _random_params(seed=0):
    """A float64 policy with non-zero biases and log-std, so every term of the derivatives matters."""
    rng = np.random.default_rng(seed)
    params = pol.init(rng, OBS_DIM, ACT_DIM, HIDDEN, dtype=np.float64)
    return {k: v + 0.1 * rng.standard_normal(v.shape) if not k.endswith(".w") else v for k, v in params.items()}


def _numpy_mean(params, obs):
    x = obs
    for i in range(3):
        x = x @ params[f"layer{i}.w"] + params[f"layer{i}.b"]
        if i < 2:
            x = np.maximum(x, 0)
    return x


def test_init_shapes_and_glorot_bounds():
    params = pol.init(np.random.default_rng(0), OBS_DIM, ACT_DIM)
    sizes = (OBS_DIM, 100, 100, ACT_DIM)
    assert sorted(params) == ["layer0.b", "layer0.w", "layer1.b", "layer1.w", "layer2.b", "layer2.w", "log_std"]
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = params[f"layer{i}.w"]
        assert w.shape == (fan_in, fan_out) and w.dtype == np.float32
        assert np.abs(w).max() <= math.sqrt(6 / (fan_in + fan_out))
        assert not params[f"layer{i}.b"].any()
    assert params["log_std"].shape == (ACT_DIM,) and not params["log_std"].any()


def test_small_output_layer_makes_a_quiet_policy_whatever_the_seed():
    """output_scale scales the output layer's Glorot draw only; at 0.01 the mean action stays near 0 for
    every seed (the policy is its std-1 noise), while the Glorot policy's mean actions are O(1)."""
    obs = np.random.default_rng(9).standard_normal((256, OBS_DIM)).astype(np.float32) * 3
    for seed in range(5):
        loud = pol.init(np.random.default_rng(seed), OBS_DIM, ACT_DIM)
        quiet = pol.init(np.random.default_rng(seed), OBS_DIM, ACT_DIM, output_scale=0.01)
        assert all(np.array_equal(quiet[k], loud[k]) for k in quiet if k != "layer2.w")
        np.testing.assert_allclose(quiet["layer2.w"], 0.01 * loud["layer2.w"], rtol=1e-6)
        loud_mean = pol.apply(loud, obs)[0].data
        quiet_mean = pol.apply(quiet, obs)[0].data
        np.testing.assert_allclose(quiet_mean, 0.01 * loud_mean, rtol=1e-4, atol=1e-6)
        assert np.abs(quiet_mean).max() < 0.1 < np.abs(loud_mean).max()
    with pytest.raises(ValueError, match="output_scale"):
        pol.init(np.random.default_rng(0), OBS_DIM, ACT_DIM, output_scale=0.0)


def test_init_is_seeded():
    a = pol.init(np.random.default_rng(3), OBS_DIM, ACT_DIM)
    b = pol.init(np.random.default_rng(3), OBS_DIM, ACT_DIM)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_apply_matches_numpy_and_batched_equals_per_task():
    rng = np.random.default_rng(1)
    tasks = [_random_params(seed) for seed in range(3)]
    batched = {k: np.stack([p[k] for p in tasks]) for k in tasks[0]}
    obs = rng.standard_normal((3, 4, 5, OBS_DIM))
    mean, log_std = pol.apply(batched, obs)
    assert mean.shape == (3, 4, 5, ACT_DIM) and log_std.shape == (3, ACT_DIM)
    for t, p in enumerate(tasks):
        single_mean, single_log_std = pol.apply(p, obs[t])
        np.testing.assert_allclose(mean.data[t], single_mean.data, rtol=1e-12)
        np.testing.assert_allclose(single_mean.data, _numpy_mean(p, obs[t]), rtol=1e-12)
        np.testing.assert_array_equal(log_std.data[t], single_log_std.data)


def test_log_prob_matches_closed_form():
    rng = np.random.default_rng(2)
    params = _random_params()
    obs, actions = rng.standard_normal((2, 6, OBS_DIM)), rng.standard_normal((2, 6, ACT_DIM))
    mean, std = _numpy_mean(params, obs), np.exp(params["log_std"])
    expected = np.sum(-0.5 * ((actions - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi), axis=-1)
    np.testing.assert_allclose(pol.log_prob(params, obs, actions).data, expected, rtol=1e-12)


def test_log_prob_derivatives_to_second_order():
    rng = np.random.default_rng(3)
    params = _random_params()
    names = list(params)
    obs, actions = rng.standard_normal((2, 5, OBS_DIM)), rng.standard_normal((2, 5, ACT_DIM))

    def f(*values):
        return pol.log_prob(dict(zip(names, values)), obs, actions)

    ad.check_grads(f, [params[k] for k in names], order=2)


def test_gaussian_kl_closed_form_and_derivatives():
    rng = np.random.default_rng(4)
    old_mean, mean = rng.standard_normal((2, 5, ACT_DIM))
    old_log_std, log_std = 0.3 * rng.standard_normal((2, ACT_DIM))
    kl = pol.gaussian_kl(old_mean, old_log_std, ad.Tensor(mean), ad.Tensor(log_std)).data
    var_old, var = np.exp(2 * old_log_std), np.exp(2 * log_std)
    expected = 0.5 * np.sum(np.log(var / var_old) + (var_old + (old_mean - mean) ** 2) / var - 1, axis=-1)
    np.testing.assert_allclose(kl, expected, rtol=1e-12)
    same = pol.gaussian_kl(old_mean, old_log_std, ad.Tensor(old_mean), ad.Tensor(old_log_std)).data
    np.testing.assert_allclose(same, 0.0, atol=1e-15)
    ad.check_grads(lambda m, s: pol.gaussian_kl(old_mean, old_log_std, m, s), [mean, log_std], order=2)


def test_sampler_policy_runs_each_task_on_its_own_weights():
    """The sampler's policy (float32, no tape) on batched params: task t's mean is the NumPy forward pass
    of task t's own weights on its own observations, its log-std task t's; float64 obs are cast."""
    tasks = [{k: v.astype(np.float32) for k, v in _random_params(seed).items()} for seed in range(3)]
    batched = {k: np.stack([p[k] for p in tasks]) for k in tasks[0]}
    obs = np.random.default_rng(5).standard_normal((3, 7, OBS_DIM))
    mean, log_std = pol.sampler_policy(batched)(obs)
    assert isinstance(mean, np.ndarray) and mean.shape == (3, 7, ACT_DIM) and mean.dtype == np.float32
    assert isinstance(log_std, np.ndarray) and log_std.shape == (3, ACT_DIM)
    for t, p in enumerate(tasks):
        expected = _numpy_mean({k: v.astype(np.float64) for k, v in p.items()}, obs[t].astype(np.float32))
        np.testing.assert_allclose(mean[t], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(log_std[t], p["log_std"])
    assert not np.allclose(mean[0], mean[1], atol=1e-3)  # the tasks' policies really differ
    shared_mean, shared_log_std = pol.sampler_policy(tasks[1])(obs[1])
    np.testing.assert_allclose(shared_mean, mean[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(shared_log_std, tasks[1]["log_std"])


def test_apply_on_4d_obs_equals_mlp_without_flattening():
    """``policy.apply`` flattens obs (T, B, H, obs_dim) to rows (T, B*H, obs_dim) before the MLP; running
    ``mlp.apply`` on the 4-D obs directly (per-task weights broadcast over B by ``linear``) must give the
    same mean, the same gradient for every parameter, and the same Hessian-vector products (MAML-TRPO
    differentiates through the policy three times). Float64."""
    rng = np.random.default_rng(6)
    tasks = [_random_params(seed) for seed in range(3)]
    batched = {k: np.stack([p[k] for p in tasks]) for k in tasks[0]}
    names = list(batched)
    t_, b_, h_ = 3, 4, 5
    obs = rng.standard_normal((t_, b_, h_, OBS_DIM))
    actions = rng.standard_normal((t_, b_, h_, ACT_DIM))
    weights = rng.standard_normal((t_, b_, h_))  # a cotangent for the log-probabilities
    cotangent = rng.standard_normal((t_, b_, h_, ACT_DIM))  # and one for the mean itself

    def via_policy(params):
        mean, log_std = pol.apply(params, obs)
        return mean, log_std

    def via_mlp(params):
        mean = mlp.apply({k: v for k, v in params.items() if k != "log_std"}, ad.as_tensor(obs))
        return mean, ad.as_tensor(params["log_std"])

    def scalar(forward, params):
        mean, log_std = forward(params)
        log_prob = pol.gaussian_log_prob(mean, log_std, ad.as_tensor(actions))
        return ad.sum(log_prob * weights) + ad.sum(mean * cotangent)

    def derivatives(forward):
        leaves = {k: ad.Tensor(batched[k], requires_grad=True) for k in names}
        mean, _ = forward(leaves)
        grads = ad.grad(scalar(forward, leaves), [leaves[k] for k in names], create_graph=True)
        direction = np.random.default_rng(7)
        inner = ad.sum(ad.stack([ad.sum(g * direction.standard_normal(g.shape)) for g in grads]))
        hv = ad.grad(inner, [leaves[k] for k in names])
        return mean.data, [g.data for g in grads], [h.data for h in hv]

    mean_p, grads_p, hv_p = derivatives(via_policy)
    mean_m, grads_m, hv_m = derivatives(via_mlp)
    assert mean_p.shape == mean_m.shape == (t_, b_, h_, ACT_DIM)
    np.testing.assert_allclose(mean_p, mean_m, rtol=1e-12, atol=1e-14)
    for name, g_p, g_m, h_p, h_m in zip(names, grads_p, grads_m, hv_p, hv_m):
        assert g_p.shape == g_m.shape == batched[name].shape, name
        assert np.abs(g_p).max() > 1e-6, name  # every parameter gets a gradient
        np.testing.assert_allclose(g_m, g_p, rtol=1e-10, atol=1e-12, err_msg=f"gradient of {name}")
        np.testing.assert_allclose(h_m, h_p, rtol=1e-10, atol=1e-12, err_msg=f"Hessian-vector product of {name}")
    # and the 4-D path's gradient is itself right (finite differences), not just equal to the rows' path;
    # 240 ReLU units here, the nearest pre-activation ~5e-6 from its kink: a small step stays on one side
    ad.check_grads(lambda *v: scalar(via_mlp, dict(zip(names, v))), [batched[k] for k in names], order=1,
                   step=1e-7)


def test_apply_rejects_wrong_obs_dim():
    with pytest.raises(ad.ShapeError):
        pol.apply(pol.init(np.random.default_rng(0), OBS_DIM, ACT_DIM), np.zeros((4, OBS_DIM + 1), np.float32))
