"""Gaussian MLP policy: initialisation, batched (per-task) application, log-probabilities and KL."""

import math

import numpy as np
import pytest

from minimaml import autodiff as ad
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


def test_sampler_policy_returns_arrays_of_batched_params():
    tasks = [pol.init(np.random.default_rng(s), OBS_DIM, ACT_DIM) for s in range(2)]
    batched = {k: np.stack([p[k] for p in tasks]) for k in tasks[0]}
    mean, log_std = pol.sampler_policy(batched)(np.zeros((2, 7, OBS_DIM)))
    assert isinstance(mean, np.ndarray) and mean.shape == (2, 7, ACT_DIM) and mean.dtype == np.float32
    assert log_std.shape == (2, ACT_DIM)


def test_apply_rejects_wrong_obs_dim():
    with pytest.raises(ad.ShapeError):
        pol.apply(pol.init(np.random.default_rng(0), OBS_DIM, ACT_DIM), np.zeros((4, OBS_DIM + 1), np.float32))
