"""Linear feature baseline (rllab's ``LinearFeatureBaseline``), one least-squares fit per task.

Features of step t of a trajectory, with o = clip(obs_t, -10, 10) and al = t / 100:

    phi_t = [o, o^2, al, al^2, al^3, 1]                       (2 * obs_dim + 4,)

Per task, the coefficients solve the ridge-regularised normal equations over that task's valid steps,

    (Phi^T Phi + reg * I) w = Phi^T R,

and rllab's retry is kept: where the solution is not finite, reg grows x10 (up to 5 tries).
"""

from __future__ import annotations

import numpy as np

MAX_TRIES = 5


def features(obs):
    """phi = [o, o^2, al, al^2, al^3, 1]: obs (..., H, obs_dim) -> (..., H, 2 * obs_dim + 4)."""
    obs = np.clip(np.asarray(obs, dtype=np.float64), -10.0, 10.0)
    horizon = obs.shape[-2]
    al = np.broadcast_to((np.arange(horizon) / 100.0)[:, None], obs.shape[:-1] + (1,))
    return np.concatenate([obs, obs**2, al, al**2, al**3, np.ones_like(al)], axis=-1)


def _solve(gram, target, reg_coeff):
    """Solve (gram + reg I) w = target per task; rows that fail or are not finite come back as NaN."""
    eye = np.eye(gram.shape[-1])
    try:
        return np.linalg.solve(gram + reg_coeff * eye, target[..., None])[..., 0]
    except np.linalg.LinAlgError:  # some task is singular: solve one by one to keep the good ones
        out = np.full(target.shape, np.nan)
        for i in range(len(gram)):
            try:
                out[i] = np.linalg.solve(gram[i] + reg_coeff * eye, target[i])
            except np.linalg.LinAlgError:
                pass
        return out


def fit_linear_baseline(obs, returns, mask, reg_coeff: float = 1e-5):
    """Fit one linear baseline per task and return its values on the same steps.

    obs: (T, B, H, obs_dim), returns: (T, B, H), mask: (T, B, H) (1 on valid steps) -> values (T, B, H),
    0 on masked steps.
    """
    obs, returns, mask = (np.asarray(a, dtype=np.float64) for a in (obs, returns, mask))
    if obs.ndim != 4 or returns.shape != obs.shape[:3] or mask.shape != returns.shape:
        raise ValueError(
            "fit_linear_baseline: expected obs (T, B, H, obs_dim), returns and mask (T, B, H); got "
            f"obs {obs.shape}, returns {returns.shape}, mask {mask.shape}"
        )
    phi = features(obs) * mask[..., None]
    gram = np.einsum("tbhf,tbhg->tfg", phi, phi)
    target = np.einsum("tbhf,tbh->tf", phi, returns)
    coeffs = _solve(gram, target, reg_coeff)
    for _ in range(MAX_TRIES - 1):
        bad = ~np.isfinite(coeffs).all(axis=-1)
        if not bad.any():
            break
        reg_coeff *= 10
        coeffs[bad] = _solve(gram[bad], target[bad], reg_coeff)
    return np.einsum("tbhf,tf->tbh", phi, coeffs)
