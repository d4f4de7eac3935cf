"""The tape itself (``Tensor``, ``record``, ``grad``, ``no_grad``, ``hvp``): accumulation over several uses,
unused inputs, no_grad, create_graph, errors; the full Hessian of a small MLP loss from Hessian-vector
products against a finite-difference Hessian; a third-order check through one MAML inner step; flat
memory over 1,000 gradient evaluations with the cycle collector disabled."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import numpy as np
import pytest
from hypothesis import given

from conftest import assert_grads, away_from_zero, fast, float_arrays, shapes
from minimaml import autodiff as ad
from minimaml.autodiff import Tensor, grad, hvp, no_grad


def leaf(a):
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


# --- accumulation, unused inputs, no_grad, create_graph ------------------------------------------------------


@fast(20)
@given(float_arrays(shapes()))
def test_gradient_accumulates_over_every_use(a):
    x = leaf(a)
    (g,) = grad(ad.sum(x * x + x), [x])
    np.testing.assert_allclose(g.data, 2 * a + 1, rtol=1e-15)
    # the same tensor along many paths, and as both operands of one op
    (g,) = grad(ad.sum(ad.tanh(x) * x + x * x * x - x), [x])
    t = np.tanh(a)
    np.testing.assert_allclose(g.data, (1 - t * t) * a + t + 3 * a * a - 1, rtol=1e-12, atol=1e-12)
    assert_grads(lambda t: t * t + t, [a])


def test_accumulation_second_order():
    x = leaf([0.5, -1.5])
    (g,) = grad(ad.sum(x * x * x + x * x), [x], create_graph=True)
    np.testing.assert_allclose(g.data, 3 * x.data ** 2 + 2 * x.data)
    (h,) = grad(ad.sum(g), [x])
    np.testing.assert_allclose(h.data, 6 * x.data + 2)


def test_gradient_of_unused_input_is_zero():
    x, y = leaf([1.0, 2.0]), leaf([[3.0, 4.0, 5.0]])
    gx, gy = grad(ad.sum(x * x), [x, y])
    np.testing.assert_array_equal(gx.data, [2.0, 4.0])
    assert gy.shape == y.shape and gy.dtype == y.dtype
    np.testing.assert_array_equal(gy.data, np.zeros((1, 3)))
    # float32 zeros for a float32 input
    z = Tensor(np.ones(2, np.float32), requires_grad=True)
    (gz,) = grad(ad.sum(x), [z])
    assert gz.dtype == np.float32 and np.all(gz.data == 0)
    # an input reached only through a constant (detached) path gets zero too
    (gx,) = grad(ad.sum(x.detach() * 3.0), [x])
    np.testing.assert_array_equal(gx.data, [0.0, 0.0])


def test_gradient_of_an_intermediate_tensor():
    x = leaf([1.0, -2.0])
    h = x * 3.0
    gx, gh = grad(ad.sum(h * h), [x, h])
    np.testing.assert_allclose(gh.data, 2 * h.data)
    np.testing.assert_allclose(gx.data, 18 * x.data)


def test_the_reverse_pass_stops_at_an_input_with_no_input_behind_it():
    """grad w.r.t. an intermediate h = f(x) alone never calls f's VJP (MAML's inner gradient w.r.t. the
    adapted parameters does no work for what they were computed from); with x among the inputs too, it does."""
    x = leaf([1.0, -2.0])
    calls = []

    def vjp(g):
        calls.append(1)
        return (g * 3.0,)

    h = ad.tensor.record(x.data * 3.0, (x,), vjp)
    (gh,) = grad(ad.sum(h * h), [h], create_graph=True)
    np.testing.assert_array_equal(gh.data, 2 * h.data)
    assert not calls
    gx, gh = grad(ad.sum(h * h), [x, h])
    np.testing.assert_array_equal(gx.data, 6 * h.data)
    assert calls == [1]


def test_no_grad_records_nothing():
    x = leaf([1.0, 2.0])
    with no_grad():
        assert not ad.is_recording()
        y = ad.sum(ad.tanh(ad.reshape(x * x, (1, 2))) @ ad.reshape(x, (2, 1)))
        z = ad.conv2d(ad.reshape(x, (1, 2, 1)), np.ones((1, 1, 1, 1)))
    assert ad.is_recording()
    for t in (y, z):
        assert t.parents == () and t.vjp is None and t.requires_grad is False
    np.testing.assert_allclose(y.data, np.tanh(x.data ** 2) @ x.data)


def test_no_grad_nests_and_restores_after_an_exception():
    with no_grad():
        with no_grad():
            pass
        assert not ad.is_recording()
    assert ad.is_recording()
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    assert ad.is_recording()


def test_operations_on_constants_record_nothing():
    y = ad.exp(Tensor(np.ones(3))) * 2.0
    assert y.parents == () and not y.requires_grad


def test_create_graph_false_gives_constants():
    x = leaf([0.3, -0.7])
    (g,) = grad(ad.sum(ad.tanh(x) ** 3), [x])
    assert g.requires_grad is False and g.parents == () and g.vjp is None
    (g2,) = grad(ad.sum(ad.tanh(x) ** 3), [x], create_graph=True)
    assert g2.requires_grad is True and g2.parents != ()
    np.testing.assert_allclose(g.data, g2.data, rtol=1e-15)
    # a constant gradient carries no dependence on x: differentiating <g, x> gives back g itself,
    # while the recorded gradient adds its own derivative (the Hessian term)
    (h,) = grad(ad.sum(g * x), [x])
    np.testing.assert_array_equal(h.data, g.data)
    (h2,) = grad(ad.sum(g2 * x), [x])
    assert not np.allclose(h2.data, g.data)


def test_grad_errors():
    x = leaf([1.0, 2.0])
    with pytest.raises(ValueError, match="scalar"):
        grad(x * x, [x])
    with pytest.raises(ValueError, match="does not require grad"):
        grad(ad.sum(x), [Tensor(np.ones(2))])
    with pytest.raises(TypeError, match="Tensor"):
        grad(ad.sum(x), [np.ones(2)])
    with pytest.raises(TypeError, match="Tensor"):
        grad(np.float64(1.0), [x])
    with pytest.raises(TypeError, match="already a Tensor"):
        Tensor(x)


def test_scalar_shaped_outputs_of_size_one():
    x = leaf([[2.0]])
    (g,) = grad(x * x, [x])  # shape (1, 1) has one element: allowed
    np.testing.assert_array_equal(g.data, [[4.0]])
    (g,) = grad(ad.sum(x), [x])
    assert g.shape == (1, 1)


def test_deep_graph_does_not_recurse():
    """20,000 chained operations (many inner steps make deep graphs): the iterative traversal copes."""
    x = leaf(0.5)
    y = x
    for _ in range(20_000):
        y = y * 1.0 + 0.0
    (g,) = grad(y, [x])
    assert float(g.data) == 1.0


def test_tensor_basics():
    t = Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    assert t.shape == (2, 3) and t.ndim == 2 and t.size == 6 and len(t) == 2 and t.dtype == np.float64
    assert "requires_grad=True" in repr(t)
    assert t.detach().requires_grad is False and t.detach().data is t.data
    assert isinstance(t.numpy(), np.ndarray)
    assert Tensor(2.5).item() == 2.5
    # ndarray on the left still dispatches to the Tensor
    assert isinstance(np.ones(3) + Tensor(np.ones(3)), Tensor)
    assert isinstance(np.ones((2, 2)) @ Tensor(np.ones((2, 2))), Tensor)


# --- a small MLP: its Hessian, and a third-order check through a MAML inner step ---------------------------------

SHAPES = [(2, 3), (3,), (3, 1), (1,)]  # a 2-3-1 MLP: W1, b1, W2, b2


def unflatten(theta):
    out, i = [], 0
    for s in SHAPES:
        n = int(np.prod(s))
        out.append(theta[i:i + n].reshape(s))
        i += n
    return out


def mlp(params, x, act):
    w1, b1, w2, b2 = params
    return act(x @ w1 + b1) @ w2 + b2


def mlp_loss(x, y, act):
    return lambda w1, b1, w2, b2: ad.mse(mlp((w1, b1, w2, b2), Tensor(x), act), Tensor(y))


def tape_gradient(f, theta):
    leaves = [leaf(p) for p in unflatten(theta)]
    return np.concatenate([g.data.ravel() for g in grad(f(*leaves), leaves)])


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_hessian_from_hvp_matches_finite_differences_and_is_symmetric(act):
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((6, 2)), rng.standard_normal((6, 1))
    theta = rng.standard_normal(13) * 0.8
    f = mlp_loss(x, y, {"tanh": ad.tanh, "relu": ad.relu}[act])
    if act == "relu":  # keep every pre-activation away from relu's kink, finite differences included
        w1, b1, _, _ = unflatten(theta)
        assert np.min(np.abs(x @ w1 + b1)) > 0.05
    n = theta.size
    hessian = np.empty((n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = 1.0
        hessian[:, j] = np.concatenate([h.ravel() for h in hvp(f, unflatten(theta), unflatten(e))])
    # finite differences of the tape's gradient, five-point stencil (error ~ h^4 + eps/h ~ 1e-12)
    h = 1e-3
    fd = np.empty((n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = h
        fd[:, j] = (-tape_gradient(f, theta + 2 * e) + 8 * tape_gradient(f, theta + e)
                    - 8 * tape_gradient(f, theta - e) + tape_gradient(f, theta - 2 * e)) / (12 * h)
    scale = np.max(np.abs(hessian))
    np.testing.assert_allclose(hessian, fd, rtol=1e-6, atol=1e-8 * scale)
    np.testing.assert_allclose(hessian, hessian.T, rtol=0, atol=1e-12 * scale)
    assert np.any(np.abs(hessian) > 1e-3)  # not a trivially zero Hessian


def test_hvp_is_linear_in_the_vector_and_matches_the_hessian_quadratic_form():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((5, 2)), rng.standard_normal((5, 1))
    f = mlp_loss(x, y, ad.tanh)
    params = [rng.standard_normal(s) for s in SHAPES]
    u = [rng.standard_normal(s) for s in SHAPES]
    v = [rng.standard_normal(s) for s in SHAPES]
    hu, hv = hvp(f, params, u), hvp(f, params, v)
    h_sum = hvp(f, params, [a + 2 * b for a, b in zip(u, v)])
    for a, b, c in zip(hu, hv, h_sum):
        np.testing.assert_allclose(c, a + 2 * b, rtol=1e-12, atol=1e-14)
    # <u, H v> = <v, H u>
    lhs = sum(float(np.sum(a * b)) for a, b in zip(u, hv))
    rhs = sum(float(np.sum(a * b)) for a, b in zip(v, hu))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


def test_third_order_through_one_maml_inner_step():
    """f(theta) = L_q(theta - alpha grad L_s(theta)): its first three derivatives need the tape's
    derivatives of L_s up to fourth order, all recorded through create_graph=True."""
    rng = np.random.default_rng(11)
    xs, ys = rng.standard_normal((5, 2)), rng.standard_normal((5, 1))
    xq, yq = rng.standard_normal((4, 2)), rng.standard_normal((4, 1))
    alpha = 0.3
    support, query = mlp_loss(xs, ys, ad.tanh), mlp_loss(xq, yq, ad.tanh)

    def meta_loss(*theta):
        grads = grad(support(*theta), list(theta), create_graph=True)
        adapted = [p - alpha * g for p, g in zip(theta, grads)]
        return query(*adapted)

    params = [rng.standard_normal(s) * 0.7 for s in SHAPES]
    report = assert_grads(meta_loss, params, order=3)
    assert report.max_rel_error(3) <= 1e-6
    assert any(abs(c.tape) > 1e-3 for c in report.checks if c.order == 3)


@fast(10)
@given(away_from_zero((2, 3), margin=0.5, hi=1.0), float_arrays((3,), -1.0, 1.0))
def test_third_order_with_relu_and_two_inner_steps(w, signs):
    """Two inner steps through a relu layer. Inputs x > 0 and every column of w1 of one sign with
    |entries| >= 0.5 put each pre-activation at |x @ w1| >= 0.5, far from relu's kink (the inner steps
    move w1 by far less)."""
    w1 = np.abs(w) * np.where(signs >= 0, 1.0, -1.0)
    x = np.linspace(0.5, 1.5, 8).reshape(4, 2)
    y = np.linspace(-1, 1, 4).reshape(4, 1)
    w2 = np.array([[0.7], [-0.4], [0.9]])

    def meta_loss(a, b):
        params = [a, b]
        for _ in range(2):
            loss = ad.mse(ad.relu(Tensor(x) @ params[0]) @ params[1], Tensor(y))
            grads = grad(loss, params, create_graph=True)
            params = [p - 0.05 * g for p, g in zip(params, grads)]
            assert np.min(np.abs(x @ params[0].data)) > 0.1
        return ad.mse(ad.relu(Tensor(x) @ params[0]) @ params[1], Tensor(y))

    assert_grads(meta_loss, [w1, w2], order=3)


# --- memory: no growth over 1,000 gradient evaluations, no reference cycles -----------------------------------------


def test_memory_stays_flat_over_1000_gradient_evaluations_without_the_cycle_collector():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 1)), rng.standard_normal((10, 1))
    params = [leaf(rng.standard_normal(s) * 0.5) for s in [(1, 20), (20,), (20, 20), (20,), (20, 1), (1,)]]

    def loss():
        h = ad.relu(Tensor(x) @ params[0] + params[1])
        h = ad.tanh(h @ params[2] + params[3])
        return ad.mse(h @ params[4] + params[5], Tensor(y))

    def second_order_step():
        # a MAML-like inner step too: the create_graph graph must be freed just as well
        grads = grad(loss(), params, create_graph=True)
        return grad(ad.sum(grads[2] * grads[2]), params)

    def iteration(i):
        grads = grad(loss(), params)
        if i % 10 == 0:
            grads = second_order_step()
        return grads

    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    # Warm up untraced first: CPython keeps freed small tuples etc. on free lists, which fill up over the
    # first few hundred iterations and then stay at their (bounded) size; traced from the start, that
    # one-off fill (~100 KiB, mostly the traversal's (node, flag) pairs) would look like growth.
    for i in range(1, 201):
        iteration(i)
    tracemalloc.start()
    try:
        probe = None
        for i in range(1, 1001):
            grads = iteration(i)
            if i == 100:
                after_100 = tracemalloc.get_traced_memory()[0]
                out = loss()
                probe = weakref.ref(out)
                del out
                # freed by reference counting alone (the collector is off): no cycles in the graph
                assert probe() is None
        after_1000 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        if was_enabled:
            gc.enable()
    assert len(grads) == len(params)
    assert after_1000 - after_100 < 32 * 1024, (after_100, after_1000)
    # nothing the loop built waits for the cycle collector
    assert gc.collect() == 0


def test_graph_is_freed_by_reference_counting():
    gc.disable()
    try:
        x = leaf(np.ones(3))
        y = ad.sum(ad.tanh(x * x) * x)
        (g,) = grad(y, [x], create_graph=True)
        refs = [weakref.ref(y), weakref.ref(g)]
        del y, g
        assert all(r() is None for r in refs)
    finally:
        gc.enable()
