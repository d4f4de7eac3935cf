"""MAML++ (Antoniou, Edwards & Storkey, ICLR 2019, "How to train your MAML"): MAML with five changes,
each a switch here as in the authors' code:

- MSL, multi-step loss: the meta-objective weighs the query loss after every inner step,
      L(theta, rates) = sum_i sum_{k=1..K} w_k(epoch) L_{Q_i}(theta_i^k),
  the weights ``step_weights`` annealed from uniform towards the last step over ``msl_epochs``;
  afterwards only the last step counts (w = (0, ..., 0, 1)).
- LSLR: a learned inner step size per layer (parameter) and per step,
      theta_i^{k+1} = theta_i^k - alpha_{l,k} grad_l L_{S_i}(theta_i^k),
  the meta-parameters ``lslr/<name>`` of shape (K,), initialised to ``inner_lr``.
- BNWB: per-step batch-norm weights and biases: ``*.bn.scale`` / ``*.bn.shift`` get a leading axis of
  K + 1 rows, row k used by the forward pass at inner step k (the query loss after K steps uses row K);
  they are meta-learned, not adapted. (BNRS, per-step running statistics, has nothing to do here: the
  networks of ``nn.conv4`` normalise with each task's batch statistics at test time too, as MAML's code.)
- DA, derivative-order annealing: first order (the inner gradients held constant) for the first
  ``first_order_epochs`` epochs, then second order.
- CA: cosine annealing of the meta-learning rate of Adam down to ``min_meta_lr``.

An epoch is ``iterations_per_epoch`` meta-iterations (the authors' 500). ``step_weights`` fixes the
multi-step loss's weights instead of annealing them.

The learned rates are not clamped, as in the authors' code (``inner_loop_optimizers.py``,
``LSLRGradientDescentLearningRule``: the initial rate is asserted positive, the learned ones are used as
they are). A rate that drifts below zero on one layer turns that layer's adaptation off (or slightly
around; on Omniglot, with the authors' settings, conv1.w's crossed zero at iteration 258 while the inner
steps kept cutting the support loss by over 99.8 %); rates that turn the inner loop into ascent are the
failure: a step whose support loss after the K inner steps exceeds the loss before them is reported
(``metrics["failure"]``, with ``support_descent`` and ``min_inner_lr`` among the metrics), and the
training loop acts on it.
"""

from __future__ import annotations

import numpy

from .. import autodiff as ad
from .. import backend, maml, optim
from . import schedules
from .maml import MAML, check_inner_steps

LSLR = "lslr/"  # the rates of parameter "conv0.w" are the meta-parameter "lslr/conv0.w", shape (K,)


def step_weights(inner_steps: int, epoch: float, msl_epochs: float) -> numpy.ndarray:
    """w_1..w_K of the multi-step loss at ``epoch`` (the authors' ``get_per_step_loss_importance_vector``):
    from 1/K each, the non-final weights decay by epoch / (K msl_epochs) to at least 0.03 / K and the last
    grows by as much in total (at most 1 - 0.03 (K - 1) / K); from ``msl_epochs`` on, only the last step."""
    k = inner_steps
    if epoch >= msl_epochs:
        return numpy.eye(k)[-1]
    decay, floor = 1.0 / k / msl_epochs, 0.03 / k
    weights = numpy.full(k, 1.0 / k)
    weights[:-1] = numpy.maximum(weights[:-1] - epoch * decay, floor)
    weights[-1] = min(weights[-1] + epoch * (k - 1) * decay, 1.0 - (k - 1) * floor)
    return weights


def is_per_step_bn(name: str) -> bool:
    return name.endswith(".bn.scale") or name.endswith(".bn.shift")


def at_step(params: dict, step: int, per_step_names) -> dict:
    """The model's parameters at inner step ``step``: row ``step`` of each per-step batch-norm parameter."""
    return {n: p[step] if n in per_step_names else p for n, p in params.items()}


def split(meta_params: dict) -> tuple:
    """(model parameters, {name: rates (K,)})."""
    model = {n: p for n, p in meta_params.items() if not n.startswith(LSLR)}
    rates = {n[len(LSLR):]: p for n, p in meta_params.items() if n.startswith(LSLR)}
    return model, rates


def inner_trajectory(task_loss, model: dict, rates: dict, support, inner_steps: int, per_step_names=(),
                     second_order: bool = True, support_losses=None):
    """theta_i^1 .. theta_i^K (dicts, adapted parameters on the task axis) by the LSLR steps
    theta^{k+1} = theta^k - rates[l][k] grad_l L_S(theta^k), the forward pass at step k using per-step
    row k. ``second_order=False``: the inner gradients enter as constants (first-order MAML, still
    differentiable in theta and the rates). ``support_losses``: a list that receives each task's support
    loss L_{S_i}(theta_i^k) for k = 0..K (arrays ``(T,)``; the last one, after the final step, costs one
    more forward pass)."""
    names = list(rates)
    theta = maml.per_task(model, support.n_tasks, names)
    trajectory = []
    for k in range(inner_steps):
        theta = maml.as_leaves(theta, names)
        losses = task_loss(at_step(theta, k, per_step_names), support)
        grads = ad.grad(ad.sum(losses), [theta[n] for n in names], create_graph=second_order)
        theta = {**theta, **{n: theta[n] - rates[n][k] * (g if second_order else ad.Tensor(g.data))
                             for n, g in zip(names, grads)}}
        trajectory.append(theta)
        if support_losses is not None:
            support_losses.append(losses.data)
    if support_losses is not None:
        with ad.no_grad():
            support_losses.append(task_loss(at_step(theta, inner_steps, per_step_names), support).data)
    return trajectory


def multi_step_objective(task_loss, meta_params: dict, tasks, inner_steps: int, weights, per_step_names=(),
                         second_order: bool = True, support_losses=None):
    """sum_k w_k sum_i L_{Q_i}(theta_i^k), the query loss at step k using per-step row k (a Tensor);
    ``support_losses``: as ``inner_trajectory``'s."""
    model, rates = split(meta_params)
    trajectory = inner_trajectory(task_loss, model, rates, tasks.support, inner_steps, per_step_names,
                                  second_order, support_losses)
    total = None
    for k, (w, theta) in enumerate(zip(weights, trajectory)):
        if w == 0:
            continue
        term = ad.sum(task_loss(at_step(theta, k + 1, per_step_names), tasks.query)) * float(w)
        total = term if total is None else total + term
    return total


class MAMLPlusPlus(MAML):
    """MAML++ with each change a switch (module docstring); the authors' Omniglot settings by default
    except the number of epochs, which an experiment sets from its budget."""

    name = "maml_pp"

    def __init__(self, inner_lr: float = 0.1, inner_steps: int = 5, *, inner_param_names=None,
                 multi_step_loss: bool = True, msl_epochs: float = 10, learned_rates: bool = True,
                 per_step_bn: bool = True, first_order_epochs: float = 0, cosine_annealing: bool = True,
                 min_meta_lr: float = 1e-5, iterations_per_epoch: int = 500, step_weights=None):
        super().__init__(inner_lr, check_inner_steps(self.name, inner_steps), inner_param_names=inner_param_names)
        if not msl_epochs > 0 or iterations_per_epoch < 1 or first_order_epochs < 0 or not min_meta_lr > 0:
            raise ValueError(f"maml_pp: need msl_epochs > 0, iterations_per_epoch >= 1, first_order_epochs >= 0, "
                             f"min_meta_lr > 0; got {msl_epochs}, {iterations_per_epoch}, {first_order_epochs}, "
                             f"{min_meta_lr}")
        self.multi_step_loss, self.msl_epochs = multi_step_loss, float(msl_epochs)
        self.learned_rates, self.per_step_bn = learned_rates, per_step_bn
        self.first_order_epochs, self.cosine_annealing = float(first_order_epochs), cosine_annealing
        self.min_meta_lr, self.iterations_per_epoch = float(min_meta_lr), int(iterations_per_epoch)
        if step_weights is not None:
            step_weights = numpy.asarray(step_weights, dtype=float)
            if step_weights.shape != (self.inner_steps,) or not (numpy.isfinite(step_weights).all()
                                                                 and (step_weights >= 0).all()):
                raise ValueError(f"maml_pp: step_weights must be {self.inner_steps} finite weights >= 0 (one per "
                                 f"inner step), got {step_weights.tolist()}")
        self.step_weights = step_weights

    def per_step_names(self, params: dict) -> tuple:
        """The batch-norm parameters with a row per step (BNWB on), else none."""
        return tuple(n for n in params if is_per_step_bn(n)) if self.per_step_bn else ()

    def _names(self, model: dict) -> list:
        names = self.adapted_names(model)
        return [n for n in names if n not in self.per_step_names(model)]

    def init(self, params: dict, rng) -> dict:
        per_step = self.per_step_names(params)
        host = {n: backend.to_numpy(p) for n, p in params.items()}
        model = {n: numpy.stack([p] * (self.inner_steps + 1)) if n in per_step else p
                 for n, p in host.items()}
        rates = {LSLR + n: numpy.full(self.inner_steps, self.inner_lr, dtype=host[n].dtype)
                 for n in self._names(params)}
        return {n: backend.asarray(p) for n, p in {**model, **rates}.items()}

    def model_params(self, meta_params):
        model, _ = split(meta_params)
        return at_step(model, self.inner_steps, self.per_step_names(model))

    def weights(self, iteration: int) -> numpy.ndarray:
        """w_1..w_K at ``iteration``: ``step_weights`` if set, else annealed (``step_weights``), or only the
        last step without the multi-step loss."""
        if self.step_weights is not None:
            return self.step_weights
        if not self.multi_step_loss:
            return numpy.eye(self.inner_steps)[-1]
        return step_weights(self.inner_steps, iteration / self.iterations_per_epoch, self.msl_epochs)

    def meta_gradient(self, task_loss, meta_params, tasks, iteration):
        second_order = iteration / self.iterations_per_epoch >= self.first_order_epochs
        weights, per_step = self.weights(iteration), self.per_step_names(meta_params)
        support_losses = []
        loss, grads = ad.value_and_grad(lambda p: multi_step_objective(task_loss, p, tasks, self.inner_steps, weights,
                                                                       per_step, second_order, support_losses),
                                        meta_params)
        if not self.learned_rates:  # LSLR off: the rates stay at inner_lr
            grads = {n: g * 0 if n.startswith(LSLR) else g for n, g in grads.items()}
        return loss, grads, self.inner_loop_metrics(meta_params, support_losses, second_order)

    def inner_loop_metrics(self, meta_params: dict, support_losses: list, second_order: bool) -> dict:
        """The smallest learned rate (``min_inner_lr``) and ``support_descent``, the meta-batch's support
        loss after the K inner steps over its loss before them; above 1 the inner steps climbed, a failure
        (a rate a little below zero on one layer alone is not: it stops adapting that layer, and the
        steps still descend)."""
        before, after = (float(backend.to_numpy(support_losses[k]).sum()) for k in (0, -1))
        metrics = {"second_order": float(second_order), "support_descent": after / before}
        _, rates = split(meta_params)
        lowest = {n: float(backend.to_numpy(r).min()) for n, r in rates.items()}
        worst = min(lowest, key=lowest.get) if lowest else None
        if worst is not None:
            metrics["min_inner_lr"] = lowest[worst]
        if not after <= before:
            rate = f" (lowest learned rate {lowest[worst]:.3g}, {worst})" if worst is not None else ""
            metrics["failure"] = (f"MAML++'s inner steps climbed: the support loss went from {before:.3g} to "
                                  f"{after:.3g} over {self.inner_steps} steps{rate}: lower --meta-lr, or set "
                                  f"--maml-pp-learned-rates false")
        return metrics

    def optimizer(self, meta_lr, n_iterations, clip_value=None):
        if not self.cosine_annealing:
            return optim.Adam(meta_lr, clip_value=clip_value)
        if self.min_meta_lr > meta_lr:
            raise ValueError(f"--maml-pp-min-meta-lr ({self.min_meta_lr:g}) must not exceed --meta-lr ({meta_lr:g}): "
                             f"the cosine annealing goes down from the meta-lr to it")
        return schedules.Scheduled(lambda lr: optim.Adam(lr, clip_value=clip_value),
                                   schedules.cosine(meta_lr, self.min_meta_lr, max(n_iterations, 1)))

    def adaptation_steps(self, task_loss, meta_params, support, steps):
        """theta^0 .. theta^steps with the learned rates (step k >= K reuses the last step's rates and
        batch-norm row K)."""
        model, rates = split(meta_params)
        names, per_step, last = list(rates), self.per_step_names(model), self.inner_steps
        theta = {n: t.detach() for n, t in maml.per_task(model, support.n_tasks, names).items()}
        yield at_step(theta, 0, per_step)
        for k in range(steps):
            step_loss = (lambda row: lambda p, data: task_loss(at_step(p, row, per_step), data))(min(k, last))
            lr = {n: ad.Tensor(r[min(k, last - 1)]) for n, r in rates.items()}
            theta = maml.inner_step(step_loss, theta, support, lr, names)
            yield at_step(theta, min(k + 1, last), per_step)
