"""The MAML-RL task loss: REINFORCE (the vanilla policy gradient) on each task's trajectories.

Per task i, on its trajectories (valid steps only, m = mask, A = centred advantages):

    L_i(theta) = - sum_{b,t} m_bt log pi_theta(a_bt | s_bt) A_bt / sum_{b,t} m_bt

This is the whole of what RL brings to MAML (Algorithm 3): ``maml.adapt(reinforce_loss, params,
pre_update, alpha, 1)`` is the inner step theta'_i = theta - alpha grad L_i(theta) for every task at
once, exactly as for regression and classification.
"""

from __future__ import annotations

from dataclasses import dataclass

from minimaml import backend
from minimaml.nn import policy as pol

@dataclass(frozen=True)
class Trajectories:
    """Sampled trajectories of T tasks on the default device, as the RL task loss reads them:
    ``obs (T, B, H, obs_dim)``, ``actions (T, B, H, act_dim)``, ``mask (T, B, H)`` (1 on valid steps),
    ``advantages (T, B, H)``."""

    obs: object
    actions: object
    mask: object
    advantages: object

    @property
    def n_tasks(self) -> int:
        return self.obs.shape[0]


def trajectories(batch: dict, advantages, dtype) -> Trajectories:
    """A sampler's batch (host arrays) and its advantages as ``Trajectories`` on the default device."""
    return Trajectories(obs=backend.asarray(batch["obs"], dtype=dtype),
                        actions=backend.asarray(batch["actions"], dtype=dtype),
                        mask=backend.asarray(batch["mask"], dtype=dtype),
                        advantages=backend.asarray(advantages, dtype=dtype))


def masked_task_mean(x, mask):
    """sum_{b,t} m x / sum_{b,t} m per task: x (T, B, H) Tensor, mask (T, B, H) array -> (T,)."""
    return (x * mask).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))


def reinforce_loss(params: dict, data: Trajectories):
    """L_i(theta_i) = - sum m log pi_theta_i(a | s) A / sum m, for each task: -> Tensor (T,).
    ``params``: the policy, shared or with a task axis T."""
    log_prob = pol.log_prob(params, data.obs, data.actions)  # (T, B, H)
    return -masked_task_mean(log_prob * data.advantages, data.mask)


def evaluation_step_sizes(inner_lr: float, n_steps: int) -> list:
    """Step sizes for evaluation: alpha for the first step, alpha / 2 after it (the authors' code)."""
    return [inner_lr if step == 0 else inner_lr / 2 for step in range(n_steps)]
