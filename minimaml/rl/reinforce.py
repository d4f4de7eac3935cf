"""The MAML-RL inner step: one REINFORCE (vanilla policy gradient) step per task, all tasks at once.

Per task i, on its pre-update trajectories (valid steps only, m = mask, A = centred advantages):

    L_i(theta) = - sum_{b,t} m_bt log pi_theta(a_bt | s_bt) A_bt / sum_{b,t} m_bt
    theta'_i   = theta - alpha * grad L_i(theta)

theta is broadcast to a task axis, theta_T = (theta, ..., theta), and the gradient of sum_i L_i with
respect to theta_T is the stack of the per-task gradients (task i's loss only sees row i). With
``create_graph=True`` the step is recorded, so theta'_i stays a differentiable function of theta for the
outer (TRPO) objective.
"""

from __future__ import annotations

from minimaml import autodiff as ad
from minimaml import backend
from minimaml.nn import policy as pol

NAVIGATION_INNER_LR = 0.5  # the authors' code for 2D navigation (the paper's text: 0.1 for all RL tasks)
INNER_LR = 0.1


def device_batch(batch: dict, advantages, dtype) -> dict:
    """The arrays the losses need, on the default device: obs (T, B, H, obs_dim),
    actions (T, B, H, act_dim), mask (T, B, H), advantages (T, B, H)."""
    return {"obs": backend.asarray(batch["obs"], dtype=dtype),
            "actions": backend.asarray(batch["actions"], dtype=dtype),
            "mask": backend.asarray(batch["mask"], dtype=dtype),
            "advantages": backend.asarray(advantages, dtype=dtype)}


def masked_task_mean(x, mask):
    """sum_{b,t} m x / sum_{b,t} m per task: x (T, B, H) Tensor, mask (T, B, H) array -> (T,)."""
    count = mask.sum(axis=(1, 2))
    return ad.divide(ad.sum(ad.multiply(x, mask), axis=(1, 2)), count)


def inner_losses(task_params: dict, data: dict):
    """L_i(theta_i) for each task (batched params with a task axis T): -> Tensor (T,)."""
    logp = pol.log_prob(task_params, data["obs"], data["actions"])  # (T, B, H)
    return ad.negative(masked_task_mean(ad.multiply(logp, data["advantages"]), data["mask"]))


def _differentiable(x):
    """x itself if it is a Tensor that requires grad, else a new leaf holding its values."""
    if isinstance(x, ad.Tensor):
        return x if x.requires_grad else ad.Tensor(x.data, requires_grad=True)
    return ad.Tensor(x, requires_grad=True)


def broadcast_to_tasks(params: dict, n_tasks: int) -> dict:
    """theta -> theta_T: each entry repeated along a new leading task axis (a recorded broadcast)."""
    if pol.is_batched(params):
        return params
    return {k: ad.broadcast_to(ad.as_tensor(v), (n_tasks,) + tuple(v.shape)) for k, v in params.items()}


def adapt(params: dict, data: dict, inner_lr: float, create_graph: bool = True) -> dict:
    """One REINFORCE step for every task: theta'_i = theta_i - alpha grad L_i(theta_i).

    params: Tensors (unbatched, or already batched after earlier steps); data: ``device_batch`` of the
    pre-update trajectories, T tasks. Returns batched params (T, ...): Tensors recorded back to
    ``params`` when ``create_graph``, else constants. Arrays and constant Tensors become fresh leaves.
    """
    n_tasks = data["obs"].shape[0]
    task_params = broadcast_to_tasks({k: _differentiable(v) for k, v in params.items()}, n_tasks)
    names = list(task_params)
    loss = ad.sum(inner_losses(task_params, data))
    grads = ad.grad(loss, [task_params[k] for k in names], create_graph=create_graph)
    adapted = {k: ad.subtract(task_params[k], ad.multiply(g, inner_lr)) for k, g in zip(names, grads)}
    return adapted if create_graph else {k: v.detach() for k, v in adapted.items()}


def evaluation_step_sizes(inner_lr: float, n_steps: int) -> list:
    """Step sizes for evaluation: alpha for the first step, alpha / 2 after it (the authors' code)."""
    return [inner_lr if step == 0 else inner_lr / 2 for step in range(n_steps)]
