"""MAML itself, the first algorithm, and the interface every algorithm of ``minimaml.algorithms`` implements.

An algorithm is built as ``Algorithm(inner_lr, inner_steps, **options)`` (the same two leading arguments
for every algorithm, the rest by keyword), holds its settings and answers five questions, all over a
meta-batch on the task axis:

- ``init(params, rng)``: the meta-parameters, the model's ``params`` plus the algorithm's own (Meta-SGD's
  step sizes, MAML++'s rates); ``model_params(meta_params)`` takes the model's back out;
- ``meta_gradient(task_loss, meta_params, tasks, iteration) -> (loss, grads, metrics)``: the
  meta-loss summed over the tasks and its gradient (what an outer optimizer steps on; an experiment
  divides both by the number of tasks), and ``metrics``, a dict of floats (solver diagnostics) with one
  more entry, ``metrics["failure"]``, a one-line message naming the setting to change, when this step's
  numerics failed (absent when they did not). Every ``meta_gradient``, ``minimaml.maml``'s included,
  returns this structure (``metrics`` is ``{}`` for MAML);
- ``optimizer(meta_lr, n_iterations, clip_value)``: the outer optimizer (Adam for MAML);
- ``adaptation_steps(task_loss, meta_params, support, steps)``: the model's parameters after 0, 1,
  ..., steps inner steps on each support set, for evaluation;
- ``test_steps(requested)``: how many of those steps an evaluation scores: ``requested``, except for an
  algorithm whose step sizes are learned for the steps it trains with (Meta-SGD: only those).
"""

from __future__ import annotations

from .. import maml, optim


def check_inner_steps(name: str, inner_steps, least: int = 1) -> int:
    """``inner_steps`` as an int >= ``least``, or a ValueError naming the algorithm."""
    if int(inner_steps) != inner_steps or inner_steps < least:
        raise ValueError(f"{name}: inner_steps must be an integer >= {least}, got {inner_steps!r}")
    return int(inner_steps)


class MAML:
    """MAML (Finn et al. 2017), Algorithm 1: theta_i = theta - alpha grad L_{S_i}(theta) (K steps),
    L(theta) = sum_i L_{Q_i}(theta_i); ``maml.meta_gradient`` in ``mode`` (second_order / hvp /
    first_order). ``inner_param_names``: the adapted parameters (default: all). ``inner_steps`` 0 is
    allowed (no adaptation: the query loss at theta)."""

    name = "maml"

    def __init__(self, inner_lr: float, inner_steps: int, *, mode: str = "second_order", inner_param_names=None):
        if not inner_lr > 0:
            raise ValueError(f"{self.name}: inner_lr must be positive, got {inner_lr}")
        if mode not in maml.MODES:
            raise ValueError(f"{self.name}: unknown mode {mode!r}: expected one of {maml.MODES}")
        self.inner_lr, self.inner_steps, self.mode = float(inner_lr), check_inner_steps(self.name, inner_steps, 0), mode
        self.inner_param_names = None if inner_param_names is None else list(inner_param_names)

    def init(self, params: dict, rng) -> dict:
        return dict(params)

    def model_params(self, meta_params: dict) -> dict:
        return meta_params

    def adapted_names(self, params: dict) -> list:
        """The parameters the inner loop adapts: ``inner_param_names``, or all of ``params``."""
        return list(params) if self.inner_param_names is None else list(self.inner_param_names)

    def meta_gradient(self, task_loss, meta_params: dict, tasks, iteration: int) -> tuple:
        return maml.meta_gradient(task_loss, meta_params, tasks, self.inner_lr, self.inner_steps,
                                  mode=self.mode, inner_param_names=self.adapted_names(meta_params))

    def optimizer(self, meta_lr: float, n_iterations: int, clip_value=None):
        return optim.Adam(meta_lr, clip_value=clip_value)

    def adaptation_steps(self, task_loss, meta_params: dict, support, steps: int):
        return maml.adaptation_steps(task_loss, meta_params, support, self.inner_lr, steps,
                                     self.adapted_names(meta_params))

    def test_steps(self, requested: int) -> int:
        return requested
