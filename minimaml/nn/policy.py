"""Gaussian MLP policy for MAML-RL: the MLP of ``nn.mlp`` (obs -> 100 -> 100 -> act, ReLU) for the
mean, plus a learned state-independent log-std.

    mean = W2 relu(W1 relu(W0 o + b0) + b1) + b2,    pi(a | o) = N(a; mean, diag(exp(log_std))^2)

Parameters are ``mlp``'s dict ``layer{i}.w (in, out)``, ``layer{i}.b (out,)``, plus ``log_std (act_dim,)``.
A *batched* dict carries a leading task axis T on every entry (``(T, in, out)``, ``(T, out)``,
``(T, act_dim)``): the T per-task adapted policies of MAML then run in one call on obs ``(T, N, obs_dim)``
or ``(T, B, H, obs_dim)``. Entries may be arrays or tape Tensors.
"""

from __future__ import annotations

import math

import numpy as np

from minimaml import autodiff as ad
from minimaml import backend
from minimaml.nn import mlp


def init(rng: np.random.Generator, obs_dim: int, act_dim: int, hidden=(100, 100), dtype=np.float32,
         output_scale: float = 1.0) -> dict:
    """Glorot-uniform weights W ~ U[-s, s], s = sqrt(6 / (fan_in + fan_out)), zero biases and
    log_std = 0 (std 1), as rllab's ``GaussianMLPPolicy``; the output layer's weights then x
    ``output_scale``. A small output layer (0.01, the experiments' default, a common choice in
    policy-gradient code) makes a quiet policy: its mean action is ~0 whatever the seed, so the untrained
    policy is the std-1 noise alone (measured in docs/rl.md: a loud Glorot policy can drive the cheetah
    0.9 m in 2 s, and its inner step moves the policy by a KL of several nats). Drawn on the host from
    ``rng``, then moved to the default device (so a seed gives the same policy on every backend)."""
    if not output_scale > 0:
        raise ValueError(f"policy.init: output_scale must be > 0, got {output_scale!r}")
    sizes = (obs_dim, *hidden, act_dim)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        scale = math.sqrt(6.0 / (fan_in + fan_out))
        params[f"layer{i}.w"] = rng.uniform(-scale, scale, size=(fan_in, fan_out))
        params[f"layer{i}.b"] = np.zeros(fan_out)
    params[f"layer{len(sizes) - 2}.w"] *= output_scale
    params["log_std"] = np.zeros(act_dim)
    return {k: backend.asarray(v, dtype=dtype) for k, v in params.items()}


def is_batched(params: dict) -> bool:
    """True when the layers carry a leading task axis (a ``layer{i}.w`` is (T, in, out)); some layers may
    be shared (ANIL adapts only the last)."""
    return any(p.ndim == 3 for n, p in params.items() if n.startswith("layer") and n.endswith(".w"))


def apply(params: dict, obs):
    """The policy's Gaussian: ``(mean, log_std)`` as Tensors.

    Unbatched params: obs (..., obs_dim) -> mean (..., act_dim), log_std (act_dim,).
    Batched params (task axis T): obs (T, ..., obs_dim) -> mean (T, ..., act_dim), log_std (T, act_dim).
    The observations go through the MLP as one matrix of rows per task, ``(T, N, obs_dim)`` (or
    ``(N, obs_dim)``), so each layer is one matrix product per task, whatever the trajectory layout.
    """
    x = ad.as_tensor(obs)
    lead = x.shape[:-1]
    rows = x.reshape(((lead[0], -1) if is_batched(params) else (-1,)) + x.shape[-1:])
    weights = {name: value for name, value in params.items() if name != "log_std"}
    mean = mlp.apply(weights, rows)
    return mean.reshape(lead + mean.shape[-1:]), ad.as_tensor(params["log_std"])


def _expand_log_std(log_std, ndim: int):
    """log_std (act_dim,) or (T, act_dim) shaped to broadcast against a mean of ``ndim`` axes."""
    if log_std.ndim == 1:
        return log_std
    return ad.reshape(log_std, (log_std.shape[0],) + (1,) * (ndim - 2) + (log_std.shape[1],))


def gaussian_log_prob(mean, log_std, actions):
    """log N(a; mean, diag(sigma^2)) = -sum_d [ (a_d - mean_d)^2 / (2 sigma_d^2) + log sigma_d ]
    - (d / 2) log(2 pi). mean, actions: (..., act_dim) -> (...,)."""
    log_std = _expand_log_std(log_std, mean.ndim)
    z = (actions - mean) * ad.exp(-log_std)  # (a - mean) / sigma
    per_dim = z * z * 0.5 + log_std
    act_dim = mean.shape[-1]
    return -per_dim.sum(axis=-1) - 0.5 * act_dim * math.log(2 * math.pi)


def log_prob(params: dict, obs, actions):
    """log pi_params(a | o): obs (..., obs_dim), actions (..., act_dim) -> (...,) (task axis first if
    batched)."""
    mean, log_std = apply(params, obs)
    return gaussian_log_prob(mean, log_std, ad.as_tensor(actions))


def gaussian_kl(old_mean, old_log_std, mean, log_std):
    """KL(N_old || N) between diagonal Gaussians, summed over action dims: (..., act_dim) -> (...,).

        KL = sum_d [ log sigma_d - log sigma_old_d + (sigma_old_d^2 + (mean_old_d - mean_d)^2)
                     / (2 sigma_d^2) - 1/2 ]
    """
    old_log_std = _expand_log_std(ad.as_tensor(old_log_std), mean.ndim)
    log_std = _expand_log_std(log_std, mean.ndim)
    inv_var = ad.exp(log_std * -2.0)  # 1 / sigma^2
    diff = ad.as_tensor(old_mean) - mean
    spread = ad.exp(old_log_std * 2.0) + diff * diff  # sigma_old^2 + (mean_old - mean)^2
    per_dim = (log_std - old_log_std) + spread * inv_var * 0.5
    return per_dim.sum(axis=-1) - 0.5 * mean.shape[-1]


def sampler_policy(params: dict):
    """The policy as the sampler wants it: ``obs (T, B, obs_dim) -> (mean, log_std)`` arrays, no tape."""
    def policy(obs):
        with ad.no_grad():
            mean, log_std = apply(params, backend.asarray(obs, dtype=params["log_std"].dtype))
        return mean.data, log_std.data
    return policy
