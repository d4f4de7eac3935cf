"""MAML: the inner loop and the meta-objective, for every problem setting, a whole meta-batch at once.

Notation (Finn et al. 2017, Algorithm 1 and Sec. 2.2): task i has a support set S_i and a query set
Q_i; ``alpha`` is ``inner_lr``; K is ``inner_steps``.

    inner loop    theta_i^0 = theta,   theta_i^{k+1} = theta_i^k - alpha * grad L_{S_i}(theta_i^k)
    meta-objective                      L(theta) = sum_i L_{Q_i}(theta_i^K)

MAML is one algorithm: regression, classification and reinforcement learning differ only in the task
loss ``task_loss(params, data) -> (T,)``, each task's loss on its own set (``data``: a set of a
``TaskBatch``, e.g. ``Examples`` or ``rl.reinforce.Trajectories``):

- regression and classification: ``supervised_loss(model.apply, loss_fn)``, e.g. the MSE or the
  cross-entropy of the model's predictions;
- reinforcement learning: ``rl.reinforce.reinforce_loss``, the policy-gradient loss on trajectories.

The tasks ride on a leading task axis: the adapted parameters of all T tasks are one dict of arrays
``(T, ...)``, and the task loss runs them on the task-axis data in one batched call. Because
sum_i L_{S_i}(theta_i) has gradient grad L_{S_i}(theta_i) with respect to theta_i, one ``grad`` call
gives every task's inner gradient.

The meta-gradient, by the chain rule through the inner loop (one step: J = I - alpha H_S(theta)):

    grad L(theta) = sum_i (I - alpha H_{S_i}(theta_i^0)) ... (I - alpha H_{S_i}(theta_i^{K-1}))
                          grad L_{Q_i}(theta_i^K)

Three ways to compute it (``mode``):

- ``"second_order"``: record the inner loop, inner gradients included (``create_graph=True``), and
  differentiate the query loss through all of it. Memory grows with K (the whole unrolled graph).
- ``"hvp"``: the same exact gradient, right to left, one step's graph at a time:
  v_K = grad L_Q(theta^K);  v_k = v_{k+1} - alpha H_S(theta^k) v_{k+1};  grad L = sum_i v_0.
  Each H v is an exact Hessian-vector product (reverse over reverse). Memory: one step's graph.
- ``"first_order"``: drop the Hessian terms (the inner gradients are constants): sum_i grad L_Q(theta_i^K).

Parameters not named in ``inner_param_names`` are meta-learned but not adapted (e.g. a batch-norm
shift); the query loss still depends on them directly and through the inner gradients.
"""

from __future__ import annotations

from . import autodiff as ad
from . import backend
from .tasks.batch import Examples, TaskBatch  # noqa: F401  (the record maml consumes, named here too)

MODES = ("second_order", "hvp", "first_order")


def supervised_loss(apply, loss_fn):
    """The task loss of regression and classification: per task, the loss of the model's predictions,

        L_i(params) = loss_fn(apply(params_i, x_i), y_i),

    as ``task_loss(params, examples: Examples) -> (T,)``. ``loss_fn(prediction, target)``: per-task
    mean losses ``(T,)``, e.g. ``autodiff.mse`` or ``autodiff.softmax_cross_entropy``."""
    def task_loss(params, examples):
        return loss_fn(apply(params, examples.x), examples.y)
    return task_loss


def _summed_loss(task_loss, params, data) -> ad.Tensor:
    """sum_i L_i(params_i): the per-task losses, summed over the task axis."""
    losses = task_loss(params, data)
    if tuple(losses.shape) != (data.n_tasks,):
        raise ValueError(f"maml: the task loss must return one loss per task, shape ({data.n_tasks},); got "
                         f"shape {tuple(losses.shape)}")
    return ad.sum(losses)


def _inner_names(params: dict, inner_param_names) -> list:
    """The adapted parameters' names, checked against ``params`` (a dict of named arrays)."""
    if not isinstance(params, dict):
        raise TypeError(f"maml: params must be a dict of named arrays (or Tensors), got a {type(params).__name__}")
    names = list(params) if inner_param_names is None else list(inner_param_names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise KeyError(f"maml: inner_param_names {unknown} are not parameters ({list(params)})")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"maml: inner_param_names must name each adapted parameter once, and at least one; "
                         f"got {names}")
    return names


def per_task(params: dict, n_tasks: int, inner_param_names=None) -> dict:
    """theta_i^0 = theta for every task: the adapted parameters get a leading task axis ``(T, ...)``
    (a recorded broadcast, so a gradient flows back to theta as the sum over the tasks)."""
    if n_tasks < 1:
        raise ValueError(f"maml: need at least one task, got {n_tasks}")
    names = _inner_names(params, inner_param_names)
    return {name: ad.broadcast_to(ad.as_tensor(p), (n_tasks,) + tuple(p.shape)) if name in names
            else ad.as_tensor(p) for name, p in params.items()}


def as_leaves(params: dict, names) -> dict:
    """``params`` as Tensors whose gradient can be taken for ``names``: a constant there (an array, or a
    Tensor that needs no gradient) becomes a leaf; a recorded Tensor stays (the chain goes on through it)."""
    return {n: p if isinstance(p, ad.Tensor) and (p.requires_grad or n not in names) else
            ad.Tensor(p.data if isinstance(p, ad.Tensor) else p, requires_grad=n in names)
            for n, p in params.items()}


def inner_step(task_loss, params: dict, support, inner_lr, inner_param_names=None,
               create_graph: bool = False) -> dict:
    """One step of every task's gradient descent on its own support loss, for the parameters in
    ``inner_param_names`` (default: all), which carry the task axis (``per_task``):

        theta_i <- theta_i - alpha * grad L_{S_i}(theta_i)

    ``inner_lr`` is a number, or a dict of per-parameter step sizes (Meta-SGD's learned alpha).
    ``create_graph=True`` records the step, so the result stays a differentiable function of ``params``
    (the second-order meta-gradient and MAML-TRPO differentiate through it); otherwise the result is
    constants, ready to be the next step's starting point.
    """
    names = _inner_names(params, inner_param_names)
    params = as_leaves(params, names)
    loss = _summed_loss(task_loss, params, support)
    grads = ad.grad(loss, [params[n] for n in names], create_graph=create_graph)
    adapted = dict(params)
    for name, g in zip(names, grads):
        lr = inner_lr[name] if isinstance(inner_lr, dict) else inner_lr
        adapted[name] = ad.gradient_step(params[name], g, lr)  # theta - lr * g, as one node
    if not create_graph:
        adapted = {n: p.detach() for n, p in adapted.items()}
    return adapted


def adapt(task_loss, params: dict, support, inner_lr, inner_steps: int, inner_param_names=None,
          create_graph: bool = False) -> dict:
    """theta_i^K for every task: ``inner_steps`` steps of gradient descent on each support set, from
    the shared ``params`` (no task axis). Returns a dict of Tensors, the adapted ones ``(T, ...)``.

    ``create_graph=True``: the whole inner loop is recorded (``params`` Tensors that require grad stay
    connected to the result); ``False``: constants, for evaluation and first-order MAML.
    """
    theta = per_task(params, support.n_tasks, inner_param_names)
    for _ in range(inner_steps):
        theta = inner_step(task_loss, theta, support, inner_lr, inner_param_names, create_graph)
    return theta


def adaptation_steps(task_loss, params: dict, support, inner_lr, inner_steps: int, inner_param_names=None):
    """Yield theta_i^0, theta_i^1, ..., theta_i^K for every task (dicts of constant Tensors; the adapted
    parameters carry a leading task axis ``(T, ...)``), for evaluating after each fine-tuning step.
    ``inner_lr`` may be a callable ``step -> lr``."""
    theta = {n: t.detach() for n, t in per_task(params, support.n_tasks, inner_param_names).items()}
    yield theta
    for step in range(inner_steps):
        lr = inner_lr(step) if callable(inner_lr) else inner_lr
        theta = inner_step(task_loss, theta, support, lr, inner_param_names)
        yield theta


def meta_gradient(task_loss, params: dict, tasks: TaskBatch, inner_lr, inner_steps: int,
                  mode: str = "second_order", inner_param_names=None, query_loss=None):
    """The meta-objective L(theta) = sum_i L_{Q_i}(theta_i^K) and its gradient.

    ``task_loss(params, data) -> (T,)``: each task's loss on a set (``supervised_loss`` for regression
    and classification); ``query_loss``: the loss on the query sets, if not the same.
    ``params``: dict of arrays (no task axis). ``mode``: ``"second_order"``, ``"hvp"`` or
    ``"first_order"`` (see the module docstring). Returns ``(meta_loss: float, grads: dict, metrics: dict)``
    with ``grads`` named and shaped like ``params``: the structure every algorithm's ``meta_gradient``
    returns (``minimaml.algorithms``); ``metrics`` is ``{}``, MAML's steps have no solver that can fail.
    """
    if mode not in MODES:
        raise ValueError(f"meta_gradient: unknown mode {mode!r}: expected one of {MODES}")
    if int(inner_steps) != inner_steps or inner_steps < 0:
        raise ValueError(f"meta_gradient: inner_steps must be an integer >= 0, got {inner_steps!r}")
    if not isinstance(params, dict) or not params:
        raise TypeError(f"meta_gradient: params must be a non-empty dict of named arrays, got "
                        f"{type(params).__name__}")
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"meta_gradient: tasks must be a TaskBatch(support, query), got {type(tasks).__name__}")
    names = _inner_names(params, inner_param_names)
    query_loss = task_loss if query_loss is None else query_loss
    if mode == "hvp":
        return _meta_gradient_hvp(task_loss, query_loss, params, tasks, inner_lr, inner_steps, names)

    if mode == "first_order":  # theta_i^K = theta + delta_i, the inner displacement delta_i held constant
        final = adapt(task_loss, params, tasks.support, inner_lr, inner_steps, names)

    def meta_objective(theta):
        if mode == "second_order":
            adapted = adapt(task_loss, theta, tasks.support, inner_lr, inner_steps, names, create_graph=True)
        else:
            adapted = per_task(theta, tasks.n_tasks, names)
            adapted = {n: adapted[n] + ad.Tensor(final[n].data - params[n]) if n in names else adapted[n]
                       for n in params}
        return _summed_loss(query_loss, adapted, tasks.query)
    meta_loss, grads = ad.value_and_grad(meta_objective, params)
    return meta_loss, grads, {}


def _meta_gradient_hvp(task_loss, query_loss, params, tasks, inner_lr, inner_steps, names):
    """The exact meta-gradient by the Hessian-vector-product chain (module docstring), which holds
    one inner step's graph at a time instead of the whole unrolled loop.

    For the adapted parameters theta (per task): v_K = grad_theta L_Q(theta^K), then for k = K-1..0
    v_k = v_{k+1} - alpha * H_S(theta^k) v_{k+1}. The other parameters phi (shared, not adapted) collect
    grad_phi L_Q(theta^K) - alpha * sum_k d/dphi <grad_theta L_S(theta^k), v_{k+1}>: phi moves the inner
    gradients too, and <grad_theta L_S, v> differentiated by phi is exactly that mixed second derivative.
    """
    others = [n for n in params if n not in names]
    xp = backend.array_namespace(next(iter(params.values())))
    # Forward: the inner trajectory theta^0 .. theta^K (arrays), nothing recorded across steps.
    trajectory = [{n: xp.broadcast_to(params[n], (tasks.n_tasks,) + params[n].shape) for n in names}]
    fixed = {n: ad.Tensor(params[n]) for n in others}
    for _ in range(inner_steps):
        step = inner_step(task_loss, {**trajectory[-1], **fixed}, tasks.support, inner_lr, names)
        trajectory.append({n: step[n].data for n in names})

    # v_K and grad_phi of the query loss at theta^K.
    theta = {n: ad.Tensor(a, requires_grad=True) for n, a in trajectory[-1].items()}
    phi = {n: ad.Tensor(params[n], requires_grad=True) for n in others}
    meta_loss = _summed_loss(query_loss, {**theta, **phi}, tasks.query)
    grads = ad.grad(meta_loss, list(theta.values()) + list(phi.values()))
    v = {n: g.data for n, g in zip(names, grads)}
    phi_grad = {n: g.data for n, g in zip(others, grads[len(names):])}

    # Backward through the inner steps: v_k = v_{k+1} - alpha H_S(theta^k) v_{k+1}.
    for k in reversed(range(inner_steps)):
        theta = {n: ad.Tensor(a, requires_grad=True) for n, a in trajectory[k].items()}
        phi = {n: ad.Tensor(params[n], requires_grad=True) for n in others}
        support_loss = _summed_loss(task_loss, {**theta, **phi}, tasks.support)
        inner_grads = ad.grad(support_loss, list(theta.values()), create_graph=True)
        alpha = {n: inner_lr[n] if isinstance(inner_lr, dict) else inner_lr for n in names}
        # d/d(theta, phi) <grad_theta L_S, alpha v>: H (alpha v) for theta and the mixed term for phi.
        product = ad.gradient_product(inner_grads, list(theta.values()) + list(phi.values()))
        second = product([v[n] * alpha[n] for n in names])
        v = {n: v[n] - h for n, h in zip(names, second)}
        phi_grad = {n: phi_grad[n] - h for n, h in zip(others, second[len(names):])}

    grads = {n: v[n].sum(axis=0) for n in names}
    grads.update(phi_grad)
    return float(meta_loss.data), {n: grads[n] for n in params}, {}
