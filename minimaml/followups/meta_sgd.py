"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning"):
the inner step size is a learned array alpha of theta's shapes, one entry per parameter entry,

    theta_i = theta - alpha (.) grad L_{S_i}(theta),        min_{theta, alpha} sum_i L_{Q_i}(theta_i),

meta-learned jointly with theta (the paper: one inner step, alpha drawn uniformly from [0.005, 0.1]).
The meta-gradient with respect to alpha: d L_Q(theta_i) / d alpha = -grad L_S(theta) (.) grad L_Q(theta_i)
(one step); both come from differentiating the recorded inner loop (``maml.adapt`` with
``create_graph=True`` and the dict of step sizes as ``inner_lr``).
"""

from __future__ import annotations

import numpy

from .. import autodiff as ad
from .. import backend, maml
from .base import MAML

ALPHA = "alpha/"  # the step size of parameter "layer0.w" is the meta-parameter "alpha/layer0.w"


def step_sizes(meta_params: dict) -> dict:
    """The learned alpha, keyed by the parameter it scales."""
    return {n[len(ALPHA):]: p for n, p in meta_params.items() if n.startswith(ALPHA)}


def model_params(meta_params: dict) -> dict:
    return {n: p for n, p in meta_params.items() if not n.startswith(ALPHA)}


def meta_sgd_objective(task_loss, meta_params: dict, tasks, inner_steps: int, inner_param_names=None,
                       create_graph: bool = True):
    """sum_i L_{Q_i}(theta_i) with theta_i = theta - alpha (.) grad L_{S_i}(theta) (``inner_steps`` times),
    a Tensor (differentiable in ``meta_params`` Tensors when ``create_graph``)."""
    theta, alpha = model_params(meta_params), step_sizes(meta_params)
    adapted = maml.adapt(task_loss, theta, tasks.support, alpha, inner_steps, list(alpha), create_graph)
    return ad.sum(task_loss(adapted, tasks.query))


def meta_gradient(task_loss, meta_params: dict, tasks, inner_steps: int = 1) -> tuple:
    """(meta-loss, grads) with respect to theta and alpha (``grads["alpha/<name>"]``)."""
    leaves = {n: ad.Tensor(p, requires_grad=True) for n, p in meta_params.items()}
    loss = meta_sgd_objective(task_loss, leaves, tasks, inner_steps)
    grads = ad.grad(loss, list(leaves.values()))
    return float(loss.data), {n: g.data for n, g in zip(leaves, grads)}


class MetaSGD(MAML):
    """Meta-SGD; ``alpha_init``: the interval alpha's entries are drawn from (the paper's [0.005, 0.1])."""

    name = "meta_sgd"

    def __init__(self, inner_steps: int = 1, alpha_init=(0.005, 0.1), inner_param_names=None):
        low, high = alpha_init
        if not 0 < low <= high:
            raise ValueError(f"meta_sgd: alpha_init must be an interval 0 < low <= high, got {alpha_init}")
        super().__init__(high, inner_steps, "second_order", inner_param_names)
        self.alpha_init = (float(low), float(high))

    def init(self, params: dict, rng) -> dict:
        names = list(params) if self.inner_param_names is None else self.inner_param_names
        alpha = {ALPHA + n: backend.asarray(rng.uniform(*self.alpha_init, tuple(params[n].shape))
                                            .astype(backend.to_numpy(params[n]).dtype)) for n in names}
        return {**params, **alpha}

    def model_params(self, meta_params):
        return model_params(meta_params)

    def meta_gradient(self, task_loss, meta_params, tasks, iteration):
        loss, grads = meta_gradient(task_loss, meta_params, tasks, self.inner_steps)
        return loss, grads, {"mean_alpha": float(numpy.mean([backend.to_numpy(a).mean()
                                                             for a in step_sizes(meta_params).values()]))}

    def adaptation_steps(self, task_loss, meta_params, support, steps):
        alpha = step_sizes(meta_params)
        return maml.adaptation_steps(task_loss, model_params(meta_params), support, alpha, steps, list(alpha))
