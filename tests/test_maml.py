"""The meta-gradient in every mode against finite differences, a closed form, and each other; for
supervised task losses and for a task loss that is not built from ``supervised_loss``."""

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimaml import autodiff as ad
from minimaml import maml
from minimaml.nn import mlp


def _tanh_mlp(params, x):
    """A smooth MLP (tanh), so finite differences meet no ReLU kinks."""
    n_layers = len(params) // 2
    h = x
    for i in range(n_layers):
        b = ad.as_tensor(params[f"layer{i}.b"])
        h = ad.matmul(h, params[f"layer{i}.w"]) + ad.reshape(b, b.shape[:-1] + (1, b.shape[-1]))
        if i < n_layers - 1:
            h = ad.tanh(h)
    return h


TANH_MSE = maml.supervised_loss(_tanh_mlp, ad.mse)
MLP_MSE = maml.supervised_loss(mlp.apply, ad.mse)


def _tasks(sx, sy, qx, qy) -> maml.TaskBatch:
    return maml.TaskBatch(maml.Examples(sx, sy), maml.Examples(qx, qy))


def _problem(seed, hidden, n_tasks, n_points):
    rng = np.random.default_rng(seed)
    params = mlp.init(rng, (1, hidden, hidden, 1), scheme="uniform", dtype=np.float64)
    tasks = _tasks(*(rng.standard_normal((n_tasks, n_points, 1)) for _ in range(4)))
    return params, tasks


def _unrolled_objective(params_names, tasks, inner_lr, steps, names=None, task_loss=TANH_MSE,
                        query_loss=None):
    """sum_i L_Q(theta_i^K) as a differentiable function of the parameter arrays (second order)."""
    names = params_names if names is None else names
    query_loss = task_loss if query_loss is None else query_loss

    def objective(*arrays):
        theta = maml.per_task(dict(zip(params_names, arrays)), tasks.n_tasks, names)
        for _ in range(steps):
            theta = maml.inner_step(task_loss, theta, tasks.support, inner_lr, names, create_graph=True)
        return ad.sum(query_loss(theta, tasks.query))
    return objective


def _directional(grads: dict, params: dict, objective, rng, h=1e-5):
    """(tape directional derivative, 4th-order central difference) along a random direction."""
    names = list(params)
    v = {n: rng.standard_normal(params[n].shape) for n in names}
    tape = sum(float(np.sum(grads[n] * v[n])) for n in names)

    def at(t):
        value = objective(*[params[n] + t * v[n] for n in names])
        return float(value.data if isinstance(value, ad.Tensor) else value)
    fd = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
    return tape, fd


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), hidden=st.integers(2, 6), n_tasks=st.integers(1, 4),
       steps=st.integers(1, 3), inner_lr=st.floats(0.01, 0.5))
def test_second_order_and_hvp_match_finite_differences(seed, hidden, n_tasks, steps, inner_lr):
    params, tasks = _problem(seed, hidden, n_tasks, 5)
    objective = _unrolled_objective(list(params), tasks, inner_lr, steps)
    rng = np.random.default_rng(seed + 1)
    for mode in ("second_order", "hvp"):
        loss, grads, _ = maml.meta_gradient(TANH_MSE, params, tasks, inner_lr, steps, mode=mode)
        assert loss == pytest.approx(float(objective(*params.values()).data), rel=1e-12)
        tape, fd = _directional(grads, params, objective, rng)
        assert abs(tape - fd) <= 1e-7 * max(abs(tape), abs(fd), 1e-3), (mode, tape, fd)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), hidden=st.integers(2, 6), n_tasks=st.integers(1, 4),
       steps=st.integers(1, 3), inner_lr=st.floats(0.01, 0.5))
def test_first_order_matches_finite_differences_of_its_objective(seed, hidden, n_tasks, steps, inner_lr):
    """First-order MAML differentiates sum_i L_Q(theta + delta_i) with the inner displacement
    delta_i = theta_i^K - theta (the accumulated inner gradient steps) held constant."""
    params, tasks = _problem(seed, hidden, n_tasks, 5)
    adapted = maml.adapt(TANH_MSE, params, tasks.support, inner_lr, steps)
    delta = {n: adapted[n].data - params[n] for n in params}
    names = list(params)

    def objective(*arrays):
        theta = {n: ad.as_tensor(a) + delta[n] for n, a in zip(names, arrays)}
        return ad.sum(ad.mse(_tanh_mlp(theta, tasks.query.x), tasks.query.y))

    _, grads, _ = maml.meta_gradient(TANH_MSE, params, tasks, inner_lr, steps, mode="first_order")
    tape, fd = _directional(grads, params, objective, np.random.default_rng(seed))
    assert abs(tape - fd) <= 1e-7 * max(abs(tape), abs(fd), 1e-3)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n_tasks=st.integers(1, 5), steps=st.integers(0, 4),
       inner_lr=st.floats(0.001, 0.5))
def test_second_order_and_hvp_agree(seed, n_tasks, steps, inner_lr):
    params, tasks = _problem(seed, 8, n_tasks, 6)
    _, so, _ = maml.meta_gradient(MLP_MSE, params, tasks, inner_lr, steps, mode="second_order")
    _, hvp, _ = maml.meta_gradient(MLP_MSE, params, tasks, inner_lr, steps, mode="hvp")
    for name in params:
        scale = np.max(np.abs(so[name])) + 1e-300
        assert np.max(np.abs(so[name] - hvp[name])) / scale < 1e-10, name


@pytest.mark.parametrize("mode", maml.MODES)
def test_batched_tasks_equal_a_loop_over_tasks(mode):
    params, tasks = _problem(3, 7, 5, 4)
    loss, grads, _ = maml.meta_gradient(MLP_MSE, params, tasks, 0.1, 2, mode=mode)
    loop_loss, loop_grads = 0.0, {n: 0.0 for n in params}
    for i in range(tasks.n_tasks):
        one = maml.TaskBatch(*(maml.Examples(s.x[i:i + 1], s.y[i:i + 1]) for s in (tasks.support, tasks.query)))
        task_loss, task_grads, _ = maml.meta_gradient(MLP_MSE, params, one, 0.1, 2, mode=mode)
        loop_loss += task_loss
        loop_grads = {n: loop_grads[n] + task_grads[n] for n in params}
    assert loss == pytest.approx(loop_loss, rel=1e-12)
    for name in params:
        np.testing.assert_allclose(grads[name], loop_grads[name], rtol=1e-10, atol=1e-14)


def _linear_model(params, x):
    return ad.matmul(x, params["w"])


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_quadratic_loss_meta_gradient_has_the_closed_form(steps):
    """For least squares L(w) = 1/N ||X w - y||^2 (gradient 2/N X^T(Xw - y), Hessian H = 2/N X^T X):
    w_K = w - alpha sum_k grad L_S(w_k), and the meta-gradient is (I - alpha H_S)^K grad L_Q(w_K)."""
    rng = np.random.default_rng(0)
    n_tasks, n, d, alpha = 3, 6, 4, 0.1
    w = rng.standard_normal((d, 1))
    xs, xq = rng.standard_normal((n_tasks, n, d)), rng.standard_normal((n_tasks, n, d))
    ys, yq = rng.standard_normal((n_tasks, n, 1)), rng.standard_normal((n_tasks, n, 1))
    expected_loss, expected_grad = 0.0, np.zeros_like(w)
    for i in range(n_tasks):
        hessian = 2 / n * xs[i].T @ xs[i]
        wk = w.copy()
        for _ in range(steps):
            wk = wk - alpha * 2 / n * xs[i].T @ (xs[i] @ wk - ys[i])
        residual = xq[i] @ wk - yq[i]
        expected_loss += float(np.mean(residual ** 2))
        jacobian = np.linalg.matrix_power(np.eye(d) - alpha * hessian, steps)
        expected_grad += jacobian @ (2 / n * xq[i].T @ residual)
    tasks = _tasks(xs, ys, xq, yq)
    linear_mse = maml.supervised_loss(_linear_model, ad.mse)
    for mode in ("second_order", "hvp"):
        loss, grads, _ = maml.meta_gradient(linear_mse, {"w": w}, tasks, alpha, steps, mode=mode)
        assert loss == pytest.approx(expected_loss, rel=1e-13)
        np.testing.assert_allclose(grads["w"], expected_grad, rtol=1e-12)


def test_unadapted_parameters_get_the_exact_meta_gradient():
    """Parameters outside ``inner_param_names`` are not adapted but still get the second-order
    gradient (they move the inner gradients): hvp and second_order agree with finite differences."""
    params, tasks = _problem(5, 5, 3, 5)
    names = ["layer0.w", "layer1.w", "layer2.w", "layer2.b"]  # hidden biases stay shared
    objective = _unrolled_objective(list(params), tasks, 0.2, 2, names=names)
    results = {mode: maml.meta_gradient(TANH_MSE, params, tasks, 0.2, 2, mode=mode,
                                        inner_param_names=names)[1] for mode in ("second_order", "hvp")}
    for name in params:
        np.testing.assert_allclose(results["hvp"][name], results["second_order"][name], rtol=1e-10)
    tape, fd = _directional(results["second_order"], params, objective, np.random.default_rng(1))
    assert abs(tape - fd) <= 1e-7 * max(abs(tape), abs(fd))


def test_float32_in_float32_out():
    """float32 parameters and data give a float32 meta-gradient and a meta-loss equal in every mode to
    the same mode in float64 (from the same float32 values) to float32 precision: a step done at
    lower precision, or a term the float32 path drops, would not pass."""
    params, tasks = _problem(0, 5, 2, 4)
    arrays = [a.astype(np.float32) for a in (tasks.support.x, tasks.support.y, tasks.query.x, tasks.query.y)]
    single = ({n: p.astype(np.float32) for n, p in params.items()}, _tasks(*arrays))
    double = ({n: p.astype(np.float32).astype(np.float64) for n, p in params.items()},
              _tasks(*(a.astype(np.float64) for a in arrays)))
    for mode in maml.MODES:
        loss32, grads32, _ = maml.meta_gradient(MLP_MSE, *single, 0.1, 2, mode=mode)
        loss64, grads64, _ = maml.meta_gradient(MLP_MSE, *double, 0.1, 2, mode=mode)
        assert abs(loss32 - loss64) <= 1e-6 * abs(loss64)
        for name, g in grads32.items():
            assert g.dtype == np.float32, name
            scale = np.abs(grads64[name]).max()
            np.testing.assert_allclose(g, grads64[name], rtol=1e-5, atol=1e-6 * scale, err_msg=f"{mode} {name}")


def test_bad_arguments_are_named():
    params, tasks = _problem(0, 3, 1, 2)
    with pytest.raises(ValueError, match="mode"):
        maml.meta_gradient(MLP_MSE, params, tasks, 0.1, 1, mode="third_order")
    with pytest.raises(KeyError, match="nope"):
        maml.meta_gradient(MLP_MSE, params, tasks, 0.1, 1, inner_param_names=["nope"])
    for names in ([], ["layer0.w", "layer0.w"]):
        for mode in maml.MODES:
            with pytest.raises(ValueError, match="name each adapted parameter once, and at least one"):
                maml.meta_gradient(MLP_MSE, params, tasks, 0.1, 1, mode=mode, inner_param_names=names)
    with pytest.raises(ValueError, match="x and y must be arrays.*got list and list"):
        maml.Examples([[1.0]], [[1.0]])


def test_a_task_loss_must_return_one_loss_per_task():
    params, tasks = _problem(0, 3, 2, 2)

    def summed(params, data):  # a scalar instead of (T,)
        return ad.sum(MLP_MSE(params, data))

    for mode in maml.MODES:
        with pytest.raises(ValueError, match=r"one loss per task, shape \(2,\); got shape \(\)"):
            maml.meta_gradient(summed, params, tasks, 0.1, 1, mode=mode)


def test_adaptation_steps_reduce_the_support_loss():
    params, tasks = _problem(2, 10, 4, 8)
    thetas = list(maml.adaptation_steps(MLP_MSE, params, tasks.support, 0.05, 5))
    assert all(not t.requires_grad for theta in thetas for t in theta.values())  # constants
    assert all(theta[n].shape == (4,) + params[n].shape for theta in thetas for n in params)
    losses = [float(ad.sum(MLP_MSE(theta, tasks.support)).data) for theta in thetas]
    assert len(losses) == 6
    assert losses[-1] < losses[0]


# --- arguments are checked before any work -----------------------------------------------------------


def _counting_loss(calls: list):
    """MLP_MSE that records each call, to show that a rejected call does no work."""
    def task_loss(params, data):
        calls.append(data)
        return MLP_MSE(params, data)
    return task_loss


@pytest.mark.parametrize("support_shape, query_shape", [
    ((0, 5, 1), (0, 5, 1)),  # zero tasks
    ((2, 0, 1), (2, 5, 1)),  # zero support points
    ((2, 5, 1), (2, 0, 1)),  # zero query points
])
def test_empty_task_batches_are_rejected_before_any_work(support_shape, query_shape):
    params, _ = _problem(0, 3, 1, 2)
    calls = []
    for mode in maml.MODES:
        with pytest.raises(ValueError, match="at least one task and one example"):
            maml.meta_gradient(_counting_loss(calls), params,
                               _tasks(np.zeros(support_shape), np.zeros(support_shape),
                                      np.zeros(query_shape), np.zeros(query_shape)), 0.1, 1, mode=mode)
    assert calls == []


def test_malformed_examples_and_task_batches_are_rejected():
    with pytest.raises(ValueError, match=r"x \(2, 5, 1\) and y \(2, 4, 1\)"):
        maml.Examples(np.zeros((2, 5, 1)), np.zeros((2, 4, 1)))
    with pytest.raises(ValueError, match="must both start with"):
        maml.Examples(np.zeros((5,)), np.zeros((5,)))
    with pytest.raises(ValueError, match="support set has 2 tasks, the query set 3"):
        _tasks(np.zeros((2, 5, 1)), np.zeros((2, 5, 1)), np.zeros((3, 5, 1)), np.zeros((3, 5, 1)))


def test_bad_params_and_tasks_are_type_errors_named_before_any_work():
    params, tasks = _problem(0, 3, 1, 2)
    calls = []
    with pytest.raises(TypeError, match="params must be a non-empty dict.*got list"):
        maml.meta_gradient(_counting_loss(calls), list(params.values()), tasks, 0.1, 1)
    with pytest.raises(TypeError, match="params must be a non-empty dict"):
        maml.meta_gradient(_counting_loss(calls), {}, tasks, 0.1, 1)
    with pytest.raises(TypeError, match="tasks must be a TaskBatch.*got tuple"):
        maml.meta_gradient(_counting_loss(calls), params, (tasks.support, tasks.query), 0.1, 1)
    with pytest.raises(ValueError, match="inner_steps"):
        maml.meta_gradient(_counting_loss(calls), params, tasks, 0.1, 1.5)
    with pytest.raises(ValueError, match="inner_steps"):
        maml.meta_gradient(_counting_loss(calls), params, tasks, 0.1, -1)
    assert calls == []


# --- a task loss that is not supervised: maml is model- and loss-agnostic ----------------------------


@dataclass(frozen=True)
class Anchors:
    """A task set that is not ``Examples``: per-task anchors ``a (T, d)`` and weights ``c (T, d)``;
    all maml may read of it is ``n_tasks``."""

    a: np.ndarray
    c: np.ndarray

    @property
    def n_tasks(self) -> int:
        return self.a.shape[0]


def anchor_loss(params, data: Anchors):
    """L_i(w, s) = sum_j c_ij tanh(a_ij w_ij + s_ij) + (w_ij - a_ij)^2 / 2 + s_ij^2 / 4: a smooth,
    non-quadratic loss coupling w and s. ``w, s``: (d,) shared or (T, d) adapted."""
    w, s = ad.as_tensor(params["w"]), ad.as_tensor(params["s"])
    u = ad.tanh(w * data.a + s)
    return ad.sum(data.c * u + 0.5 * (w - data.a) * (w - data.a) + 0.25 * s * s, axis=-1)


def _anchor_numpy(w, s, data):
    """anchor_loss per task, and its gradients in w and s, written out in NumPy (float64)."""
    u = np.tanh(w * data.a + s)
    loss = np.sum(data.c * u + 0.5 * (w - data.a) ** 2 + 0.25 * s ** 2, axis=-1)
    return loss, data.c * data.a * (1 - u ** 2) + (w - data.a), data.c * (1 - u ** 2) + 0.5 * s


def _anchor_inner_loop(w, s, support, inner_lr, steps, adapt_s):
    """theta_i^K of the inner loop in NumPy: w adapted per task, s too if ``adapt_s`` (else shared)."""
    w = np.broadcast_to(w, support.a.shape)
    if adapt_s:
        s = np.broadcast_to(s, support.a.shape)
    for _ in range(steps):
        _, gw, gs = _anchor_numpy(w, s, support)
        w = w - inner_lr * gw
        if adapt_s:
            s = s - inner_lr * gs
    return w, s


def _anchor_problem(seed, n_tasks, d):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal(d), "s": rng.standard_normal(d)}
    tasks = maml.TaskBatch(*(Anchors(rng.standard_normal((n_tasks, d)), rng.standard_normal((n_tasks, d)))
                             for _ in range(2)))
    return params, tasks


@pytest.mark.parametrize("inner_param_names", [None, ["w"]])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("mode", maml.MODES)
def test_a_non_supervised_task_loss_matches_finite_differences(mode, steps, inner_param_names):
    """``meta_gradient`` of a task loss on a custom set record (no x, no y, not ``supervised_loss``),
    checked against central differences of the objective written out in NumPy: the unrolled
    sum_i L_Q(theta_i^K) for second_order and hvp, and for first_order its own objective
    sum_i L_Q(theta + delta_i) with the inner displacement delta_i held constant."""
    inner_lr, adapt_s = 0.3, inner_param_names is None
    for seed in range(3):
        params, tasks = _anchor_problem(seed, n_tasks=3, d=4)
        w_k, s_k = _anchor_inner_loop(params["w"], params["s"], tasks.support, inner_lr, steps, adapt_s)

        if mode == "first_order":
            delta_w, delta_s = w_k - params["w"], s_k - params["s"]

            def objective(w, s):
                return float(np.sum(_anchor_numpy(w + delta_w, s + delta_s, tasks.query)[0]))
        else:
            def objective(w, s):
                return float(np.sum(_anchor_numpy(*_anchor_inner_loop(w, s, tasks.support, inner_lr, steps,
                                                                      adapt_s), tasks.query)[0]))

        loss, grads, _ = maml.meta_gradient(anchor_loss, params, tasks, inner_lr, steps, mode=mode,
                                            inner_param_names=inner_param_names)
        assert set(grads) == {"w", "s"} and all(grads[n].shape == params[n].shape for n in params)
        assert loss == pytest.approx(float(np.sum(_anchor_numpy(w_k, s_k, tasks.query)[0])), rel=1e-12)
        tape, fd = _directional(grads, params, objective, np.random.default_rng(seed + 10))
        assert abs(tape - fd) <= 1e-7 * max(abs(tape), abs(fd), 1e-3), (mode, seed, tape, fd)


def test_a_non_supervised_task_loss_adapts_with_inner_step_and_adapt():
    """``per_task``, ``inner_step`` and ``adapt`` take the custom record too and agree with NumPy."""
    params, tasks = _anchor_problem(0, n_tasks=3, d=4)
    w_k, s_k = _anchor_inner_loop(params["w"], params["s"], tasks.support, 0.3, 2, adapt_s=True)
    adapted = maml.adapt(anchor_loss, params, tasks.support, 0.3, 2)
    assert not any(t.requires_grad for t in adapted.values())
    np.testing.assert_allclose(adapted["w"].data, w_k, rtol=1e-13)
    np.testing.assert_allclose(adapted["s"].data, s_k, rtol=1e-13)
    theta = maml.per_task(params, tasks.n_tasks)
    for _ in range(2):
        theta = maml.inner_step(anchor_loss, theta, tasks.support, 0.3)
    for name in params:
        np.testing.assert_allclose(theta[name].data, adapted[name].data, rtol=1e-13)
    steps = list(maml.adaptation_steps(anchor_loss, params, tasks.support, 0.3, 2))
    np.testing.assert_allclose(steps[-1]["w"].data, w_k, rtol=1e-13)


# --- query_loss: a different loss on the query sets -----------------------------------------------------


def _cauchy(prediction, target):
    """mean log(1 + (prediction - target)^2) over (N, D): a smooth loss that is not the MSE."""
    diff = prediction - target
    return ad.mean(ad.log(1.0 + diff * diff), axis=(-2, -1))


TANH_CAUCHY = maml.supervised_loss(_tanh_mlp, _cauchy)


@pytest.mark.parametrize("mode", maml.MODES)
def test_query_loss_scores_the_query_sets(mode):
    """With ``query_loss=``, the support sets are adapted on ``task_loss`` (MSE) and the query sets
    scored by ``query_loss`` (Cauchy): the meta-gradient matches central differences of exactly that
    objective, and differs from using either loss for both sets."""
    params, tasks = _problem(4, 4, 3, 5)
    inner_lr, steps = 0.2, 2
    if mode == "first_order":
        adapted = maml.adapt(TANH_MSE, params, tasks.support, inner_lr, steps)  # adapted on the MSE
        delta = {n: adapted[n].data - params[n] for n in params}
        names = list(params)

        def objective(*arrays):
            return ad.sum(TANH_CAUCHY({n: ad.as_tensor(a) + delta[n] for n, a in zip(names, arrays)},
                                      tasks.query))
    else:
        objective = _unrolled_objective(list(params), tasks, inner_lr, steps, task_loss=TANH_MSE,
                                        query_loss=TANH_CAUCHY)
    loss, grads, _ = maml.meta_gradient(TANH_MSE, params, tasks, inner_lr, steps, mode=mode,
                                        query_loss=TANH_CAUCHY)
    assert loss == pytest.approx(float(objective(*params.values()).data), rel=1e-12)
    tape, fd = _directional(grads, params, objective, np.random.default_rng(0))
    assert abs(tape - fd) <= 1e-7 * max(abs(tape), abs(fd), 1e-3), (tape, fd)

    for task_loss, query_loss in ((TANH_MSE, None), (TANH_CAUCHY, None), (TANH_CAUCHY, TANH_CAUCHY)):
        other_loss, other, _ = maml.meta_gradient(task_loss, params, tasks, inner_lr, steps, mode=mode,
                                                  query_loss=query_loss)
        assert other_loss != pytest.approx(loss, rel=1e-6)
        assert any(not np.allclose(other[n], grads[n], rtol=1e-6) for n in params)
