"""Discounted returns and generalised advantage estimation over padded trajectories.

Trajectories are arrays ``(..., H)`` (any leading axes, e.g. tasks x trajectories) with a mask that is 1
while the episode is alive and 0 after it ended; masked steps contribute nothing and get 0.
A discounted sum ``y_t = x_t + c * y_{t+1}`` runs backwards in time; ``scipy.signal.lfilter`` does it for
all leading axes at once.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter


def _check(name, rewards, mask):
    if rewards.shape != mask.shape or rewards.ndim < 1:
        raise ValueError(f"{name}: rewards {rewards.shape} and mask {mask.shape} must share a shape (..., H)")


def discount_cumsum(x, discount: float):
    """y_t = sum_{k >= t} discount^(k - t) x_k along the last axis: (..., H) -> (..., H)."""
    x = np.asarray(x, dtype=np.float64)
    return lfilter([1.0], [1.0, -discount], x[..., ::-1], axis=-1)[..., ::-1]


def discounted_returns(rewards, mask, discount: float = 0.99):
    """R_t = sum_{k >= t} discount^(k - t) r_k m_k, and 0 where m_t = 0: (..., H) -> (..., H)."""
    rewards, mask = np.asarray(rewards, dtype=np.float64), np.asarray(mask, dtype=np.float64)
    _check("discounted_returns", rewards, mask)
    return discount_cumsum(rewards * mask, discount) * mask


def gae(rewards, values, mask, discount: float = 0.99, gae_lambda: float = 1.0):
    """Generalised advantage estimates (Schulman et al. 2016), as rllab computes them per path.

        delta_t = r_t + discount * V_{t+1} m_{t+1} - V_t      (V after the last step is 0)
        A_t     = sum_{k >= t} (discount * lambda)^(k - t) delta_k,   0 where m_t = 0

    rewards, values, mask: (..., H) -> advantages (..., H). With lambda = 1, A_t = R_t - V_t.
    """
    rewards, mask = np.asarray(rewards, dtype=np.float64), np.asarray(mask, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    _check("gae", rewards, mask)
    if values.shape != rewards.shape:
        raise ValueError(f"gae: values {values.shape} must match rewards {rewards.shape}")
    values = values * mask
    next_values = np.concatenate([values[..., 1:], np.zeros_like(values[..., :1])], axis=-1)
    deltas = (rewards + discount * next_values - values) * mask
    return discount_cumsum(deltas, discount * gae_lambda) * mask
