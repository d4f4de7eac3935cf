"""The meta-gradient in every mode against finite differences, a closed form, and each other."""

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


def _problem(seed, hidden, n_tasks, n_points):
    rng = np.random.default_rng(seed)
    params = mlp.init(rng, (1, hidden, hidden, 1), scheme="uniform", dtype=np.float64)
    tasks = maml.TaskBatch(*(rng.standard_normal((n_tasks, n_points, 1)) for _ in range(4)))
    return params, tasks


def _unrolled_objective(params_names, tasks, inner_lr, steps, names=None):
    """sum_i L_Q(theta_i^K) as a differentiable function of the parameter arrays (second order)."""
    names = params_names if names is None else names

    def objective(*arrays):
        theta = maml._per_task(dict(zip(params_names, arrays)), names, tasks.n_tasks)
        for _ in range(steps):
            theta = maml.inner_step(_tanh_mlp, ad.mse, theta, tasks.support_x, tasks.support_y,
                                    inner_lr, names, create_graph=True)
        return ad.sum(ad.mse(_tanh_mlp(theta, tasks.query_x), tasks.query_y))
    return objective


def _directional(grads: dict, params: dict, objective, rng, h=1e-5):
    """(tape directional derivative, 4th-order central difference) along a random direction."""
    names = list(params)
    v = {n: rng.standard_normal(params[n].shape) for n in names}
    tape = sum(float(np.sum(grads[n] * v[n])) for n in names)

    def at(t):
        return float(objective(*[params[n] + t * v[n] for n in names]).data)
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
        loss, grads = maml.meta_gradient(_tanh_mlp, ad.mse, params, tasks, inner_lr, steps, mode=mode)
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
    adapted = maml.adapt(_tanh_mlp, ad.mse, params, tasks.support_x, tasks.support_y, inner_lr, steps)
    delta = {n: adapted[n].data - params[n] for n in params}
    names = list(params)

    def objective(*arrays):
        theta = {n: ad.as_tensor(a) + delta[n] for n, a in zip(names, arrays)}
        return ad.sum(ad.mse(_tanh_mlp(theta, tasks.query_x), tasks.query_y))

    _, grads = maml.meta_gradient(_tanh_mlp, ad.mse, params, tasks, inner_lr, steps, mode="first_order")
    tape, fd = _directional(grads, params, objective, np.random.default_rng(seed))
    assert abs(tape - fd) <= 1e-7 * max(abs(tape), abs(fd), 1e-3)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n_tasks=st.integers(1, 5), steps=st.integers(0, 4),
       inner_lr=st.floats(0.001, 0.5))
def test_second_order_and_hvp_agree(seed, n_tasks, steps, inner_lr):
    params, tasks = _problem(seed, 8, n_tasks, 6)
    _, so = maml.meta_gradient(mlp.apply, ad.mse, params, tasks, inner_lr, steps, mode="second_order")
    _, hvp = maml.meta_gradient(mlp.apply, ad.mse, params, tasks, inner_lr, steps, mode="hvp")
    for name in params:
        scale = np.max(np.abs(so[name])) + 1e-300
        assert np.max(np.abs(so[name] - hvp[name])) / scale < 1e-10, name


@pytest.mark.parametrize("mode", maml.MODES)
def test_batched_tasks_equal_a_loop_over_tasks(mode):
    params, tasks = _problem(3, 7, 5, 4)
    loss, grads = maml.meta_gradient(mlp.apply, ad.mse, params, tasks, 0.1, 2, mode=mode)
    loop_loss, loop_grads = 0.0, {n: 0.0 for n in params}
    for i in range(tasks.n_tasks):
        one = maml.TaskBatch(*(a[i:i + 1] for a in (tasks.support_x, tasks.support_y,
                                                    tasks.query_x, tasks.query_y)))
        task_loss, task_grads = maml.meta_gradient(mlp.apply, ad.mse, params, one, 0.1, 2, mode=mode)
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
    tasks = maml.TaskBatch(xs, ys, xq, yq)
    for mode in ("second_order", "hvp"):
        loss, grads = maml.meta_gradient(_linear_model, ad.mse, {"w": w}, tasks, alpha, steps, mode=mode)
        assert loss == pytest.approx(expected_loss, rel=1e-13)
        np.testing.assert_allclose(grads["w"], expected_grad, rtol=1e-12)


def test_unadapted_parameters_get_the_exact_meta_gradient():
    """Parameters outside ``inner_param_names`` are not adapted but still get the second-order
    gradient (they move the inner gradients): hvp and second_order agree with finite differences."""
    params, tasks = _problem(5, 5, 3, 5)
    names = ["layer0.w", "layer1.w", "layer2.w", "layer2.b"]  # hidden biases stay shared
    objective = _unrolled_objective(list(params), tasks, 0.2, 2, names=names)
    results = {mode: maml.meta_gradient(_tanh_mlp, ad.mse, params, tasks, 0.2, 2, mode=mode,
                                        inner_param_names=names)[1] for mode in ("second_order", "hvp")}
    for name in params:
        np.testing.assert_allclose(results["hvp"][name], results["second_order"][name], rtol=1e-10)
    tape, fd = _directional(results["second_order"], params, objective, np.random.default_rng(1))
    assert abs(tape - fd) <= 1e-7 * max(abs(tape), abs(fd))


def test_float32_in_float32_out():
    params, tasks = _problem(0, 5, 2, 4)
    params = {n: p.astype(np.float32) for n, p in params.items()}
    tasks = maml.TaskBatch(*(a.astype(np.float32) for a in (tasks.support_x, tasks.support_y,
                                                            tasks.query_x, tasks.query_y)))
    for mode in maml.MODES:
        _, grads = maml.meta_gradient(mlp.apply, ad.mse, params, tasks, 0.01, 2, mode=mode)
        assert all(g.dtype == np.float32 for g in grads.values())


def test_bad_arguments_are_named():
    params, tasks = _problem(0, 3, 1, 2)
    with pytest.raises(ValueError, match="mode"):
        maml.meta_gradient(mlp.apply, ad.mse, params, tasks, 0.1, 1, mode="third_order")
    with pytest.raises(KeyError, match="nope"):
        maml.meta_gradient(mlp.apply, ad.mse, params, tasks, 0.1, 1, inner_param_names=["nope"])


def test_adaptation_steps_reduce_the_support_loss():
    params, tasks = _problem(2, 10, 4, 8)
    losses = [float(ad.sum(ad.mse(mlp.apply(theta, tasks.support_x), tasks.support_y)).data)
              for theta in maml.adaptation_steps(mlp.apply, ad.mse, params, tasks.support_x,
                                                 tasks.support_y, 0.05, 5)]
    assert len(losses) == 6
    assert losses[-1] < losses[0]
