"""The follow-ups' derivative checks, in float64, shared by ``python -m minimaml.verify`` and the tests.
Each returns a relative error (or a list of them):

- ``meta_sgd_error``: Meta-SGD's meta-gradient w.r.t. theta and alpha against central differences of
  its objective;
- ``maml_pp_error``: MAML++'s multi-step loss gradient w.r.t. theta, the per-layer per-step rates and the
  per-step batch-norm rows (a small conv + batch-norm net), against central differences;
- ``reptile_error``: Reptile's batched update against a direct loop over the tasks, one at a time;
- ``imaml_least_squares_error``: the implicit gradient against the closed form on linear least squares
  with the proximal term;
- ``imaml_convergence``: on an MLP, the implicit gradient against differences of L_Q(phi*(theta)) as the
  inner solve and CG tighten (the curve).
"""

from __future__ import annotations

import numpy

from .. import autodiff as ad
from .. import maml
from ..nn import conv4, mlp
from ..tasks.batch import Examples, TaskBatch
from . import imaml, maml_pp, meta_sgd, reptile


def directional_fd(f, params: dict, direction: dict, h: float = 1e-6) -> float:
    """Five-point central difference of ``f`` (dict of arrays -> float) along ``direction``."""
    def at(t):
        return f({n: params[n] + t * direction[n] for n in params})
    return (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _along(grads: dict, direction: dict) -> float:
    return float(sum(numpy.sum(grads[n] * direction[n]) for n in grads))


def _regression(rng, sizes=(1, 8, 8, 1), n_tasks=3):
    params = mlp.init(rng, sizes=sizes, scheme="uniform", dtype=numpy.float64)
    d = sizes[0]
    tasks = TaskBatch(Examples(rng.standard_normal((n_tasks, 5, d)), rng.standard_normal((n_tasks, 5, 1))),
                      Examples(rng.standard_normal((n_tasks, 6, d)), rng.standard_normal((n_tasks, 6, 1))))
    return maml.supervised_loss(mlp.apply, ad.mse), params, tasks


def meta_sgd_error(seed: int = 0, inner_steps: int = 2) -> dict:
    """{"theta": error, "alpha": error} along random directions of each."""
    rng = numpy.random.default_rng(seed)
    loss, params, tasks = _regression(rng)
    meta_params = meta_sgd.MetaSGD((0.02, 0.1), inner_steps).init(params, rng)
    _, grads, _ = meta_sgd.meta_gradient(loss, meta_params, tasks, inner_steps)

    def objective(p):
        return float(meta_sgd.meta_sgd_objective(loss, p, tasks, inner_steps, create_graph=False).data)
    errors = {}
    for part, selected in (("theta", lambda n: not n.startswith(meta_sgd.ALPHA)),
                           ("alpha", lambda n: n.startswith(meta_sgd.ALPHA))):
        direction = {n: rng.standard_normal(p.shape) * selected(n) for n, p in meta_params.items()}
        errors[part] = _relative(_along(grads, direction), directional_fd(objective, meta_params, direction))
    return errors


def maml_pp_error(seed: int = 0, inner_steps: int = 3, second_order: bool = True) -> dict:
    """{"theta", "rates", "bn rows"}: errors of the multi-step-loss gradient (annealed weights of epoch 2
    of 10) along random directions of each group, on a conv + batch-norm net with per-step BN rows."""
    rng = numpy.random.default_rng(seed)
    net = conv4.Conv4(image_size=16, filters=2, stride=1, max_pool=True, features="flatten")
    params = net.init(rng, 3, dtype=numpy.float64)
    tasks = TaskBatch(Examples(rng.standard_normal((2, 3, 16, 16, 1)), rng.integers(0, 3, (2, 3))),
                      Examples(rng.standard_normal((2, 6, 16, 16, 1)), rng.integers(0, 3, (2, 6))))
    loss = maml.supervised_loss(net.apply, ad.softmax_cross_entropy)
    algorithm = maml_pp.MAMLPlusPlus(inner_lr=0.1, inner_steps=inner_steps, per_step_bn=True, msl_epochs=10,
                                     iterations_per_epoch=1, first_order_epochs=0 if second_order else 100)
    meta_params = algorithm.init(params, rng)
    meta_params = {n: p + 0.1 * rng.standard_normal(p.shape) for n, p in meta_params.items()}  # rows differ
    _, grads, _ = algorithm.meta_gradient(loss, meta_params, tasks, iteration=2)
    weights, per_step = algorithm.weights(2), algorithm.per_step_names(meta_params)

    def objective(p):
        if second_order:
            return float(maml_pp.multi_step_objective(loss, p, tasks, inner_steps, weights, per_step).data)
        return _frozen_multi_step(loss, meta_params, p, tasks, inner_steps, weights, per_step)
    groups = (("theta", lambda n: not n.startswith(maml_pp.LSLR) and n not in per_step),
              ("rates", lambda n: n.startswith(maml_pp.LSLR)), ("bn rows", lambda n: n in per_step))
    errors = {}
    for part, selected in groups:
        direction = {n: rng.standard_normal(p.shape) * selected(n) for n, p in meta_params.items()}
        errors[part] = _relative(_along(grads, direction), directional_fd(objective, meta_params, direction))
    return errors


def _frozen_multi_step(loss, at, p, tasks, inner_steps, weights, per_step) -> float:
    """The first-order objective: theta^{k+1} = theta^k - rate_k g_k with the gradients g_k frozen at ``at``."""
    model_at, rates_at = maml_pp.split(at)
    frozen = maml_pp.inner_trajectory(loss, model_at, rates_at, tasks.support, inner_steps, per_step, False)
    model, rates = maml_pp.split(p)
    names = list(rates)
    # g_k from the frozen trajectory: theta^{k+1} - theta^k = -rate_k g_k
    previous = {n: numpy.broadcast_to(model_at[n], (tasks.n_tasks,) + model_at[n].shape) for n in names}
    theta = {n: numpy.broadcast_to(model[n], previous[n].shape) for n in names}
    total = 0.0
    for k, step in enumerate(frozen):
        g = {n: (previous[n] - step[n].data) / rates_at[n][k] for n in names}
        theta = {n: theta[n] - rates[n][k] * g[n] for n in names}
        previous = {n: step[n].data for n in names}
        with ad.no_grad():
            adapted = maml_pp.at_step({**model, **theta}, k + 1, per_step)
            total += weights[k] * float(ad.sum(loss(adapted, tasks.query)).data)
    return total


def reptile_error(seed: int = 0, optimizer: str = "adam", inner_steps: int = 4) -> float:
    """The batched Reptile direction against a loop over the tasks one at a time, each with plain NumPy
    gradient steps of its own optimizer (largest entry difference / largest entry)."""
    rng = numpy.random.default_rng(seed)
    loss, params, tasks = _regression(rng)
    data = reptile.pooled(tasks)
    _, batched = reptile.reptile_direction(loss, params, data, 0.01, inner_steps, optimizer)
    direct = {n: numpy.zeros_like(p) for n, p in params.items()}
    for i in range(tasks.n_tasks):
        one = Examples(data.x[i:i + 1], data.y[i:i + 1])
        phi = dict(params)
        opt = reptile.inner_optimizer(optimizer, 0.01)
        state = opt.init(phi)
        for _ in range(inner_steps):
            _, grads = ad.value_and_grad(lambda p: ad.sum(loss(p, one)), phi)
            phi, state = opt.update(phi, grads, state)
        for n in params:
            direct[n] += params[n] - phi[n]
    scale = max(numpy.abs(direct[n]).max() for n in direct)
    return float(max(numpy.abs(batched[n] - direct[n]).max() for n in direct) / scale)


def imaml_least_squares_error(seed: int = 0, lam: float = 2.0, cg_damping: float = 0.0,
                              lambda_damping: float = 0.0) -> dict:
    """Linear least squares, L_S(phi) = mean_j (x_j . w + b - y_j)^2, whose proximal solution is
    phi* = (H + lambda I)^{-1} (c + lambda theta) with H = 2 A^T A / n (A = [x, 1]), c = 2 A^T y / n, so
    d L_Q(phi*) / d theta = (I + H / lambda)^{-1} grad L_Q(phi*) (with the dampings: the solution of the
    authors' code's system, ((1 + cg_damping) I + H / (lambda + lambda_damping))^{-1} grad L_Q(phi*)).
    Returns the relative errors of phi* (inner solve) and of the gradient (CG on exact Hessian-vector
    products)."""
    rng = numpy.random.default_rng(seed)
    loss, params, tasks = _regression(rng, sizes=(4, 1), n_tasks=3)
    d = params["layer0.w"].shape[0]
    # enough inner steps (each contracts the error by at least 1 - 0.1 lambda = 0.8) and CG steps (the
    # problem is 5-dimensional) to converge to roundoff
    adapted, _ = imaml.proximal_solve(loss, params, tasks.support, 0.1, 300, lam)
    _, grads, _ = imaml.implicit_gradient(loss, adapted, tasks, lam, 12, cg_damping=cg_damping,
                                          lambda_damping=lambda_damping)
    theta = numpy.concatenate([params["layer0.w"][:, 0], params["layer0.b"]])
    expected_grad, phi_error = numpy.zeros(d + 1), 0.0
    for i in range(tasks.n_tasks):
        def design(x):
            return numpy.concatenate([x, numpy.ones((x.shape[0], 1))], axis=1)
        a, y = design(tasks.support.x[i]), tasks.support.y[i][:, 0]
        n = a.shape[0]
        h = 2 * a.T @ a / n
        phi = numpy.linalg.solve(h + lam * numpy.eye(d + 1), 2 * a.T @ y / n + lam * theta)
        got = numpy.concatenate([adapted["layer0.w"][i, :, 0], adapted["layer0.b"][i]])
        phi_error = max(phi_error, numpy.abs(got - phi).max() / numpy.abs(phi).max())
        aq, yq = design(tasks.query.x[i]), tasks.query.y[i][:, 0]
        query_grad = 2 * aq.T @ (aq @ phi - yq) / aq.shape[0]
        system = (1 + cg_damping) * numpy.eye(d + 1) + h / (lam + lambda_damping)
        expected_grad += numpy.linalg.solve(system, query_grad)
    got_grad = numpy.concatenate([grads["layer0.w"][:, 0], grads["layer0.b"]])
    return {"phi*": float(phi_error),
            "gradient": float(numpy.abs(got_grad - expected_grad).max() / numpy.abs(expected_grad).max())}


def tanh_mlp(params: dict, x):
    """A smooth perceptron, ``mlp.apply`` with tanh (for the iMAML convergence checks: with ReLU, gradient
    descent on the proximal problem stalls at the kinks instead of converging)."""
    return mlp.apply(params, x, activation=ad.tanh)


def imaml_convergence(seed: int = 0, lam: float = 2.0, settings=((2, 1), (8, 2), (32, 4), (64, 8), (200, 16)),
                      reference_steps: int = 300) -> list:
    """On a 1-16-1 tanh MLP: [(inner steps, CG steps, relative error, CG residual)] of the implicit
    gradient along a random direction against central differences of L_Q(phi*(theta)), phi* by
    ``reference_steps`` inner steps (a tight solve)."""
    rng = numpy.random.default_rng(seed)
    _, params, tasks = _regression(rng, sizes=(1, 16, 1))
    loss = maml.supervised_loss(tanh_mlp, ad.mse)
    direction = {n: rng.standard_normal(p.shape) for n, p in params.items()}

    def objective(theta):
        *_, phi = imaml.proximal_adapt(loss, theta, tasks.support, 0.1, reference_steps, lam)
        with ad.no_grad():
            return float(ad.sum(loss(phi, tasks.query)).data)
    fd = directional_fd(objective, params, direction, h=1e-5)
    curve = []
    for inner_steps, cg_steps in settings:
        _, grads, metrics = imaml.implicit_meta_gradient(loss, params, tasks, 0.1, inner_steps, lam, cg_steps)
        curve.append((inner_steps, cg_steps, _relative(_along(grads, direction), fd), metrics["cg_residual"]))
    return curve


def tanh_sinusoid(seed: int = 0, n_tasks: int = 4) -> tuple:
    """(task loss, params, tasks): ``n_tasks`` sinusoid tasks (10 support and 10 query points) for a
    1-40-40-1 tanh MLP with PyTorch's uniform initialisation, in float64."""
    from ..tasks import sinusoid
    params = mlp.init(numpy.random.default_rng(seed), sizes=(1, 40, 40, 1), scheme="uniform", dtype=numpy.float64)
    sampled = sinusoid.sample_batch(numpy.random.default_rng(seed), n_tasks, 10)
    tasks = TaskBatch(*[Examples(s.x.astype(numpy.float64), s.y.astype(numpy.float64))
                        for s in (sampled.support, sampled.query)])
    return maml.supervised_loss(tanh_mlp, ad.mse), params, tasks


def imaml_at_defaults(seed: int = 0, reference_steps: int = 1000) -> dict:
    """``IMAML()`` at its defaults (inner step 0.1, 16 steps, 5 CG steps, tolerance 1e-3) on 4 sinusoid
    tasks of a 1-40-40-1 tanh MLP (float64), where the support Hessian's top eigenvalue makes a step of 0.1
    too long for plain gradient descent: its metrics (``imaml_stationarity``, ``cg_residual``, ``failure``)
    and the relative error of its meta-gradient against a tight solve (backtracking, ``reference_steps``
    inner steps, 40 CG steps), with that solve's own stationarity and residual. The check: the defaults
    either converge and agree with the tight solve, or say that they did not."""
    loss, params, tasks = tanh_sinusoid(seed)
    with numpy.errstate(all="ignore"):  # plain descent may overflow: the metrics say so
        _, grads, metrics = imaml.IMAML().meta_gradient(loss, params, tasks, 0)
    _, reference, tight = imaml.IMAML(0.1, reference_steps, cg_steps=40, backtracking=True).meta_gradient(
        loss, params, tasks, 0)
    difference = max(numpy.abs(grads[n] - reference[n]).max() for n in params)
    scale = max(numpy.abs(reference[n]).max() for n in params)
    error = float(difference / scale) if numpy.isfinite(difference) else float("inf")
    return {**metrics, "error": error, "reference_stationarity": tight["imaml_stationarity"],
            "reference_cg_residual": tight["cg_residual"]}
