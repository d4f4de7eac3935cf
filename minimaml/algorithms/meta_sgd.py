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
from .maml import MAML, check_inner_steps

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
    """(meta-loss, grads, metrics) with respect to theta and alpha (``grads["alpha/<name>"]``); metrics:
    the mean and the smallest entry of alpha (``mean_alpha``, ``min_inner_lr``)."""
    loss, grads = ad.value_and_grad(lambda p: meta_sgd_objective(task_loss, p, tasks, inner_steps), meta_params)
    alpha = [backend.to_numpy(a) for a in step_sizes(meta_params).values()]
    metrics = {"mean_alpha": float(numpy.mean([a.mean() for a in alpha])),
               "min_inner_lr": float(min(a.min() for a in alpha))}
    return loss, grads, metrics


class MetaSGD(MAML):
    """Meta-SGD. ``inner_lr``: alpha's initial value, a number (every entry) or an interval ``(low, high)``
    its entries are drawn from uniformly (the paper's (0.005, 0.1)); ``inner_steps``: the paper's 1."""

    name = "meta_sgd"

    def __init__(self, inner_lr=(0.005, 0.1), inner_steps: int = 1, *, inner_param_names=None):
        low, high = (inner_lr, inner_lr) if numpy.ndim(inner_lr) == 0 else inner_lr
        if not 0 < low <= high:
            raise ValueError(f"meta_sgd: inner_lr (alpha's initial value) must be positive, or an interval "
                             f"0 < low <= high; got {inner_lr}")
        super().__init__(high, check_inner_steps(self.name, inner_steps), inner_param_names=inner_param_names)
        self.inner_lr = (float(low), float(high))

    def init(self, params: dict, rng) -> dict:
        names = self.adapted_names(params)
        alpha = {ALPHA + n: backend.asarray(rng.uniform(*self.inner_lr, tuple(params[n].shape))
                                            .astype(backend.to_numpy(params[n]).dtype)) for n in names}
        return {**params, **alpha}

    def model_params(self, meta_params):
        return model_params(meta_params)

    def meta_gradient(self, task_loss, meta_params, tasks, iteration):
        return meta_gradient(task_loss, meta_params, tasks, self.inner_steps)

    def adaptation_steps(self, task_loss, meta_params, support, steps):
        alpha = step_sizes(meta_params)
        return maml.adaptation_steps(task_loss, model_params(meta_params), support, alpha, steps, list(alpha))

    def test_steps(self, requested: int) -> int:
        """alpha is learned for ``inner_steps`` steps, and Meta-SGD is tested with as many (the paper, and
        the public reimplementations: one step in training and at test); more steps of the learned alpha
        are an extrapolation it was not trained for (on the sinusoid, 5 and 10 of them diverged on 28 and
        192 of 600 test tasks), so an evaluation scores at most ``inner_steps``."""
        return min(requested, self.inner_steps)
