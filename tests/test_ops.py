"""The primitives of ``minimaml.autodiff.ops``: forward values against NumPy, and first- and second-order
derivatives against finite differences (``check_grads``, relative error <= 1e-6) over hypothesis-drawn
shapes (broadcasting and batch axes included) and values; the adjoint identity of every linear shape
operation; dtype preservation; clear errors for mismatched shapes and dtypes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import (assert_dtype_preserved, assert_grads, away_from_zero, axes_for, distinct_arrays,
                      fast, float_arrays, lattice_arrays, positive_arrays, shapes, to_gpu_and_check)
from minimaml import autodiff as ad
from minimaml.autodiff import ShapeError, Tensor

two_broadcastable = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3)


def const(a):
    return Tensor(np.asarray(a))


def leaf(a):
    return Tensor(np.asarray(a), requires_grad=True)


# --- binary arithmetic with broadcasting ----------------------------------------------------------------


@fast(30)
@given(st.data(), two_broadcastable)
def test_add_subtract_multiply_broadcasting(data, bshapes):
    sa, sb = bshapes.input_shapes
    a = data.draw(float_arrays(sa), label="a")
    b = data.draw(float_arrays(sb), label="b")
    np.testing.assert_array_equal(ad.add(a, b).data, a + b)
    np.testing.assert_array_equal(ad.subtract(a, b).data, a - b)
    np.testing.assert_array_equal(ad.multiply(a, b).data, a * b)
    assert_grads(ad.add, [a, b])
    assert_grads(ad.subtract, [a, b])
    assert_grads(ad.multiply, [a, b])
    # the operators and a composite that mixes them
    assert_grads(lambda x, y: (x - y) * (x + y) * x, [a, b])


@fast(30)
@given(st.data(), two_broadcastable)
def test_divide_broadcasting(data, bshapes):
    sa, sb = bshapes.input_shapes
    a = data.draw(float_arrays(sa), label="a")
    b = data.draw(away_from_zero(sb, margin=0.5), label="b")  # |b| >= 0.5: far from the pole
    np.testing.assert_allclose(ad.divide(a, b).data, a / b, rtol=1e-15)
    assert_grads(ad.divide, [a, b])
    assert_grads(lambda x, y: y / x, [b, b.copy()])


@fast(20)
@given(float_arrays(shapes()))
def test_negative(a):
    np.testing.assert_array_equal(ad.negative(a).data, -a)
    assert_grads(ad.negative, [a])
    assert_grads(lambda x: -x * x, [a])


def test_python_scalars_on_either_side():
    x = leaf([1.0, -2.0, 3.0])
    for f, expected in [(lambda t: 2.0 + t, [1, 1, 1]), (lambda t: 2.0 - t, [-1, -1, -1]),
                        (lambda t: 3.0 * t, [3, 3, 3]), (lambda t: t / 2.0, [0.5, 0.5, 0.5]),
                        (lambda t: 1.0 / t, [-1.0, -0.25, -1 / 9]), (lambda t: t - 1.0, [1, 1, 1])]:
        (g,) = ad.grad(ad.sum(f(x)), [x])
        np.testing.assert_allclose(g.data, expected, rtol=1e-15)


# --- power -----------------------------------------------------------------------------------------------


@fast(30)
@given(st.data(), shapes(), st.integers(-3, 4))
def test_power_integer_exponent(data, shape, p):
    # negative exponents are poles at 0; keep |x| >= 0.3 for all of them (and for p >= 0 too, harmless)
    x = data.draw(away_from_zero(shape, margin=0.3, hi=1.7), label="x")
    np.testing.assert_allclose(ad.power(x, p).data, x ** float(p), rtol=1e-14)
    assert_grads(lambda t: ad.power(t, p), [x])
    assert_grads(lambda t: t ** p, [x])


@fast(25)
@given(st.data(), shapes(), st.floats(-2.5, 3.5, allow_nan=False, allow_subnormal=False))
def test_power_real_exponent_of_positive_base(data, shape, p):
    x = data.draw(positive_arrays(shape, lo=0.3, hi=2.0), label="x")
    np.testing.assert_allclose(ad.power(x, p).data, x ** p, rtol=1e-14)
    assert_grads(lambda t: ad.power(t, p), [x])


@fast(30)
@given(st.data(), two_broadcastable)
def test_power_tensor_exponent(data, bshapes):
    sx, sp = bshapes.input_shapes
    x = data.draw(positive_arrays(sx, lo=0.3, hi=2.0), label="x")
    p = data.draw(float_arrays(sp, -2.0, 2.0), label="p")
    np.testing.assert_allclose(ad.power(x, Tensor(p)).data, x ** p, rtol=1e-13)
    assert_grads(lambda t, e: ad.power(t, e), [x, p])
    assert_grads(lambda t, e: t ** e, [x, p])


@pytest.mark.parametrize("p", [1, 2, 3])
def test_power_derivatives_at_zero_are_finite(p):
    """x ** p is a polynomial for p = 1, 2, 3: all its derivatives exist at x = 0 (d^k/dx^k x^p at 0 is
    p! for k = p, else 0). The VJP g * p * x^(p-1) reaches x ** 0 and then x ** -1 = inf at 0, and
    0 * inf = nan: a polynomial's higher derivatives must not become NaN at 0 (e.g. x ** 2 of a weight
    that is exactly 0 at third order, as in a MAML meta-gradient's Hessian check)."""
    x = leaf(0.0)
    value = x ** p
    derivatives = []
    for _ in range(p + 1):
        (value,) = ad.grad(value, [x], create_graph=True)
        derivatives.append(float(value.data))
    expected = [0.0] * (p + 1)
    expected[p - 1] = float(np.prod(np.arange(1, p + 1)))
    assert derivatives == expected


# --- elementwise functions -------------------------------------------------------------------------------


@fast(25)
@given(float_arrays(shapes(), -2.0, 2.0))
def test_exp(x):
    np.testing.assert_allclose(ad.exp(x).data, np.exp(x), rtol=1e-15)
    assert_grads(ad.exp, [x])


@fast(25)
@given(positive_arrays(shapes(), lo=0.2, hi=3.0))
def test_log_and_sqrt_of_positive_values(x):
    np.testing.assert_allclose(ad.log(x).data, np.log(x), rtol=1e-15)
    np.testing.assert_allclose(ad.sqrt(x).data, np.sqrt(x), rtol=1e-15)
    assert_grads(ad.log, [x])
    assert_grads(ad.sqrt, [x])


@fast(25)
@given(float_arrays(shapes(), -3.0, 3.0))
def test_tanh(x):
    np.testing.assert_allclose(ad.tanh(x).data, np.tanh(x), rtol=1e-15)
    assert_grads(ad.tanh, [x])


@fast(25)
@given(float_arrays(shapes(), -6.0, 6.0))  # both branches of the stable formula
def test_sigmoid(x):
    np.testing.assert_allclose(ad.sigmoid(x).data, 1 / (1 + np.exp(-x)), rtol=1e-14)
    assert_grads(ad.sigmoid, [x])


def test_sigmoid_is_stable_for_large_inputs():
    x = leaf([-800.0, -40.0, 0.0, 40.0, 800.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # exp(-800) = 0 may underflow
        s = ad.sigmoid(x)
        (g,) = ad.grad(ad.sum(s), [x])
    assert np.all(np.isfinite(s.data)) and s.data[0] == 0.0 and s.data[-1] == 1.0
    assert np.all(np.isfinite(g.data)) and g.data[2] == 0.25


@fast(25)
@given(away_from_zero(shapes(), margin=0.1))
def test_relu_and_abs_away_from_the_kink(x):
    np.testing.assert_array_equal(ad.relu(x).data, np.maximum(x, 0))
    np.testing.assert_array_equal(ad.abs(x).data, np.abs(x))
    assert_grads(ad.relu, [x])
    assert_grads(ad.abs, [x])
    assert_grads(lambda t: ad.relu(t) * t + ad.abs(t) * t * t, [x])


@fast(30)
@given(st.data(), two_broadcastable)
def test_maximum_without_ties(data, bshapes):
    sa, sb = bshapes.input_shapes
    a = data.draw(lattice_arrays(sa, offset=0.25), label="a")  # a - b is never closer to 0 than 0.25
    b = data.draw(lattice_arrays(sb, offset=0.0), label="b")
    np.testing.assert_array_equal(ad.maximum(a, b).data, np.maximum(a, b))
    assert_grads(ad.maximum, [a, b])
    assert_grads(lambda x, y: ad.maximum(x, y) * x * y, [a, b])


def test_maximum_ties_go_to_the_first_operand():
    a, b = leaf([1.0, 2.0]), leaf([1.0, 3.0])
    ga, gb = ad.grad(ad.sum(ad.maximum(a, b)), [a, b])
    np.testing.assert_array_equal(ga.data, [1.0, 0.0])
    np.testing.assert_array_equal(gb.data, [0.0, 1.0])


@fast(30)
@given(st.data(), hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, max_side=3))
def test_where_broadcasting(data, bshapes):
    sm, sa, sb = bshapes.input_shapes
    mask = data.draw(hnp.arrays(np.bool_, sm), label="mask")
    a = data.draw(float_arrays(sa), label="a")
    b = data.draw(float_arrays(sb), label="b")
    np.testing.assert_array_equal(ad.where(mask, a, b).data, np.where(mask, a, b))
    assert_grads(lambda x, y: ad.where(mask, x, y), [a, b])
    assert_grads(lambda x, y: ad.where(mask, x * y, ad.tanh(y)), [a, b])


# --- reductions --------------------------------------------------------------------------------------------


@fast(40)
@given(st.data(), shapes(min_dims=0, max_dims=4, max_side=3), st.booleans())
def test_sum_and_mean_over_axes(data, shape, keepdims):
    x = data.draw(float_arrays(shape), label="x")
    axis = data.draw(axes_for(len(shape)), label="axis")
    np.testing.assert_allclose(ad.sum(x, axis, keepdims).data, np.sum(x, axis=axis, keepdims=keepdims),
                               rtol=1e-14, atol=1e-15)
    if x.size:
        np.testing.assert_allclose(ad.mean(x, axis, keepdims).data,
                                   np.mean(x, axis=axis, keepdims=keepdims), rtol=1e-14, atol=1e-15)
    assert_grads(lambda t: ad.sum(t, axis, keepdims), [x])
    assert_grads(lambda t: ad.sum(t * t, axis, keepdims) * ad.sum(t), [x])
    if x.size:
        assert_grads(lambda t: ad.mean(t, axis, keepdims), [x])
        assert_grads(lambda t: ad.mean(ad.tanh(t), axis, keepdims) ** 2, [x])


@fast(40)
@given(st.data(), shapes(min_dims=0, max_dims=3, max_side=4), st.booleans())
def test_max_over_axes_without_ties(data, shape, keepdims):
    x = data.draw(distinct_arrays(shape), label="x")  # entries at least 0.2 apart
    axis = data.draw(axes_for(len(shape)), label="axis")
    np.testing.assert_array_equal(ad.max(x, axis, keepdims).data, np.max(x, axis=axis, keepdims=keepdims))
    assert_grads(lambda t: ad.max(t, axis, keepdims), [x])
    assert_grads(lambda t: ad.max(t * t * t, axis, keepdims), [x])  # t -> t^3 is monotone: no new ties


def test_max_shares_the_gradient_between_tied_entries():
    x = leaf([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]])
    (g,) = ad.grad(ad.sum(ad.max(x, axis=1)), [x])
    np.testing.assert_array_equal(g.data, [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])


def test_tensor_methods_match_functions():
    x = np.arange(6.0).reshape(2, 3)
    t = Tensor(x)
    np.testing.assert_array_equal(t.sum(axis=0).data, x.sum(axis=0))
    np.testing.assert_array_equal(t.mean(1, True).data, x.mean(1, keepdims=True))
    np.testing.assert_array_equal(t.max().data, x.max())
    np.testing.assert_array_equal(t.reshape(3, 2).data, x.reshape(3, 2))
    np.testing.assert_array_equal(t.reshape((6,)).data, x.reshape(6))
    np.testing.assert_array_equal(t.T.data, x.T)
    np.testing.assert_array_equal(t.transpose(1, 0).data, x.T)
    np.testing.assert_array_equal(t[1, ::2].data, x[1, ::2])
    np.testing.assert_array_equal((t @ t.T).data, x @ x.T)


# --- shape operations --------------------------------------------------------------------------------------


@st.composite
def broadcast_to_pairs(draw):
    """(source shape, target shape) with ``broadcast_to(source, target)`` valid: source is a suffix of
    target with some sides replaced by 1."""
    target = draw(shapes(min_dims=0, max_dims=4, max_side=3))
    k = draw(st.integers(0, len(target)))
    suffix = target[len(target) - k:]
    ones = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    return tuple(1 if one else n for n, one in zip(suffix, ones)), target


@fast(30)
@given(st.data(), broadcast_to_pairs())
def test_broadcast_to(data, pair):
    source, target = pair
    x = data.draw(float_arrays(source), label="x")
    np.testing.assert_array_equal(ad.broadcast_to(x, target).data, np.broadcast_to(x, target))
    assert_grads(lambda t: ad.broadcast_to(t, target), [x])
    assert_grads(lambda t: ad.broadcast_to(t * t, target) * ad.broadcast_to(t, target), [x])


@st.composite
def reshape_pairs(draw):
    shape = draw(shapes(min_dims=0, max_dims=4, max_side=3))
    n = int(np.prod(shape, dtype=np.int64))
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    d = draw(st.sampled_from(divisors))
    new = draw(st.sampled_from([(n,), (d, n // d), (n // d, 1, d), (-1, d), (d, -1), tuple(reversed(shape)),
                                (1,) + tuple(shape) + (1,)]))
    return shape, new


@fast(30)
@given(st.data(), reshape_pairs())
def test_reshape(data, pair):
    shape, new = pair
    x = data.draw(float_arrays(shape), label="x")
    np.testing.assert_array_equal(ad.reshape(x, new).data, x.reshape(new))
    assert_grads(lambda t: ad.reshape(t, new), [x])
    assert_grads(lambda t: ad.reshape(ad.tanh(t), new) ** 2, [x])


@fast(30)
@given(st.data(), shapes(min_dims=0, max_dims=4, max_side=3))
def test_transpose_and_swapaxes(data, shape):
    x = data.draw(float_arrays(shape), label="x")
    ndim = len(shape)
    perm = data.draw(st.none() | st.permutations(list(range(ndim))).map(tuple), label="axes")
    np.testing.assert_array_equal(ad.transpose(x, perm).data, np.transpose(x, perm))
    assert_grads(lambda t: ad.transpose(t, perm), [x])
    assert_grads(lambda t: ad.transpose(t * t, perm) * ad.transpose(t, perm), [x])
    if ndim:
        a1 = data.draw(st.integers(-ndim, ndim - 1), label="axis1")
        a2 = data.draw(st.integers(-ndim, ndim - 1), label="axis2")
        np.testing.assert_array_equal(ad.swapaxes(x, a1, a2).data, np.swapaxes(x, a1, a2))
        assert_grads(lambda t: ad.swapaxes(t, a1, a2) ** 3, [x])


@fast(40)
@given(st.data(), shapes(min_dims=1, max_dims=3, max_side=4))
def test_getitem_basic_indices(data, shape):
    x = data.draw(float_arrays(shape), label="x")
    index = data.draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True), label="index")
    np.testing.assert_array_equal(ad.getitem(x, index).data, x[index])
    assert_grads(lambda t: ad.getitem(t, index), [x])
    assert_grads(lambda t: ad.getitem(t * t, index) * ad.getitem(t, index), [x])


@st.composite
def integer_array_indices_with_repeats(draw, shape):
    """An integer-array index into ``shape``, entries drawn with replacement (so usually repeated),
    alone on the first axis, on one axis among slices, or one array per leading axis."""
    kind = draw(st.sampled_from(["first", "middle", "tuple"]))
    if kind == "tuple":
        return draw(hnp.integer_array_indices(shape, result_shape=hnp.array_shapes(max_dims=2, max_side=5)))
    axis = 0 if kind == "first" else draw(st.integers(0, len(shape) - 1))
    n = shape[axis]
    entries = draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=2 * n + 2))
    idx = np.asarray(entries, dtype=np.int64)
    if draw(st.booleans()) and len(entries) % 2 == 0:
        idx = idx.reshape(2, -1)
    return idx if axis == 0 else (slice(None),) * axis + (idx,)


@fast(40)
@given(st.data(), shapes(min_dims=1, max_dims=3, max_side=4))
def test_getitem_integer_arrays_with_repeats(data, shape):
    x = data.draw(float_arrays(shape), label="x")
    index = data.draw(integer_array_indices_with_repeats(shape), label="index")
    np.testing.assert_array_equal(ad.getitem(x, index).data, x[index])
    assert_grads(lambda t: ad.getitem(t, index), [x])
    assert_grads(lambda t: ad.getitem(t * t, index) * ad.getitem(t, index), [x])


def test_getitem_repeated_index_sums_the_gradient():
    x = leaf([1.0, 2.0, 3.0])
    (g,) = ad.grad(ad.sum(ad.getitem(x, np.array([2, 0, 2, 2]))), [x])
    np.testing.assert_array_equal(g.data, [1.0, 0.0, 3.0])
    (g,) = ad.grad(ad.sum(ad.getitem(x, [0, 0])), [x])  # a list index, too
    np.testing.assert_array_equal(g.data, [2.0, 0.0, 0.0])


@fast(30)
@given(st.data(), shapes(min_dims=1, max_dims=3, max_side=4))
def test_getitem_boolean_masks(data, shape):
    x = data.draw(float_arrays(shape), label="x")
    k = data.draw(st.integers(1, len(shape)), label="mask dims")
    mask = data.draw(hnp.arrays(np.bool_, shape[:k]), label="mask")
    np.testing.assert_array_equal(ad.getitem(x, mask).data, x[mask])
    assert_grads(lambda t: ad.getitem(t, mask), [x])
    assert_grads(lambda t: ad.getitem(t * t, mask) * ad.getitem(t, mask), [x])


@fast(40)
@given(st.data(), shapes(min_dims=1, max_dims=3, max_side=4))
def test_scatter_add(data, shape):
    index = data.draw(integer_array_indices_with_repeats(shape) | hnp.basic_indices(shape), label="index")
    values = data.draw(float_arrays(np.zeros(shape)[index].shape), label="values")
    expected = np.zeros(shape)
    np.add.at(expected, index, values)
    np.testing.assert_allclose(ad.scatter_add(values, index, shape).data, expected, rtol=1e-15)
    assert_grads(lambda v: ad.scatter_add(v, index, shape), [values])
    assert_grads(lambda v: ad.scatter_add(v * v, index, shape) ** 2, [values])


@fast(30)
@given(st.data(), shapes(min_dims=1, max_dims=3, max_side=3), st.integers(1, 3))
def test_concatenate(data, shape, n):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    parts = []
    for i in range(n):
        side = data.draw(st.integers(1, 3), label=f"side {i}")
        part_shape = list(shape)
        part_shape[axis] = side
        parts.append(data.draw(float_arrays(tuple(part_shape)), label=f"part {i}"))
    np.testing.assert_array_equal(ad.concatenate(parts, axis).data, np.concatenate(parts, axis))
    assert_grads(lambda *ts: ad.concatenate(list(ts), axis), parts)
    assert_grads(lambda *ts: ad.concatenate([t * t for t in ts], axis) * ad.concatenate(list(ts), axis), parts)


@fast(30)
@given(st.data(), shapes(min_dims=0, max_dims=3, max_side=3), st.integers(1, 3))
def test_stack(data, shape, n):
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)), label="axis")
    parts = [data.draw(float_arrays(shape), label=f"part {i}") for i in range(n)]
    np.testing.assert_array_equal(ad.stack(parts, axis).data, np.stack(parts, axis))
    assert_grads(lambda *ts: ad.stack(list(ts), axis), parts)
    assert_grads(lambda *ts: ad.stack([ad.tanh(t) for t in ts], axis) ** 2, parts)


# --- matmul ------------------------------------------------------------------------------------------------

matmul_shapes = hnp.mutually_broadcastable_shapes(signature="(m,n),(n,p)->(m,p)", max_dims=5, max_side=3)


@fast(40)
@given(st.data(), matmul_shapes)
def test_matmul_with_batch_dims(data, mshapes):
    sa, sb = mshapes.input_shapes
    a = data.draw(float_arrays(sa), label="a")
    b = data.draw(float_arrays(sb), label="b")
    np.testing.assert_allclose(ad.matmul(a, b).data, a @ b, rtol=1e-14, atol=1e-14)
    assert_grads(ad.matmul, [a, b])
    assert_grads(lambda x, y: ad.tanh(x @ y) * (x @ y), [a, b])


@pytest.mark.parametrize("sa, sb", [((3, 2), (4, 2, 5)), ((4, 1, 3, 2), (5, 2, 2)), ((1, 3, 2), (4, 2, 2)),
                                     ((2, 3, 4), (4, 1)), ((2, 1, 3, 4), (1, 3, 4, 2))])
def test_matmul_broadcasting_batch_dims(sa, sb):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    np.testing.assert_allclose(ad.matmul(a, b).data, a @ b, rtol=1e-14)
    assert_grads(ad.matmul, [a, b])


def third_order_derivatives(f, arrays):
    """f's value, its gradients (recorded), theirs (recorded) and theirs, for a bit-for-bit comparison."""
    leaves = [leaf(a) for a in arrays]
    y = f(*leaves)
    first = ad.grad(ad.sum(ad.tanh(y) * y), leaves, create_graph=True)
    second = ad.grad(sum(ad.sum(g * g) for g in first), leaves, create_graph=True)
    third = ad.grad(sum(ad.sum(g * ad.tanh(g)) for g in second), leaves)
    return [t.data for t in [y, *first, *second, *third]]


@pytest.mark.parametrize("sa, sb", [((3, 5, 2), (3, 4, 2)), ((3, 5, 2), (4, 2)), ((5, 1), (3, 4, 1)),
                                    ((2, 1, 5, 2), (3, 4, 2))])
def test_matmul_nt_is_matmul_by_a_transpose_bit_for_bit(sa, sb):
    """matmul_nt(a, b) = a @ b^T, and matmul_tn(b', a') = b'^T @ a', as one node each: the same bits as
    ``matmul`` with a ``swapaxes`` node, through three orders of derivatives; and finite differences agree."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(sa).astype(np.float32), rng.standard_normal(sb).astype(np.float32)
    pairs = [(ad.ops.matmul_nt, lambda x, y: ad.matmul(x, ad.swapaxes(y, -1, -2)), (a, b)),
             (ad.ops.matmul_tn, lambda x, y: ad.matmul(ad.swapaxes(x, -1, -2), y),
              (np.swapaxes(a, -1, -2).copy(), np.swapaxes(b, -1, -2).copy()))]
    for fused, composed, arrays in pairs:
        for one, other in zip(third_order_derivatives(fused, arrays), third_order_derivatives(composed, arrays)):
            assert one.dtype == np.float32
            np.testing.assert_array_equal(one, other)
        assert_grads(lambda x, y: ad.tanh(fused(x, y)), [x.astype(np.float64) for x in arrays], order=3)


def composed_affine(x, w, b):
    """x @ w + b as the three primitives ``affine`` stands for: matmul, b reshaped to broadcast, add."""
    lead = b.shape[:-1]
    return ad.matmul(x, w) + ad.reshape(b, lead + (1,) * (x.ndim - 1 - len(lead)) + b.shape[-1:])


@pytest.mark.parametrize("sx, sw, sb", [((3, 5, 2), (3, 2, 4), (3, 4)), ((3, 5, 2), (2, 4), (4,)),
                                        ((3, 5, 1), (3, 1, 4), (3, 4)), ((2, 3, 5, 2), (2, 1, 2, 4), (2, 4)),
                                        ((2, 3, 1, 2), (2, 4), (2, 4)), ((5, 2), (2, 3), (3,))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_affine_is_its_composition_bit_for_bit(sx, sw, sb, dtype, relu):
    """``affine`` (one node) gives the same bits as matmul + reshape + add (then ``relu``, with
    ``relu=True``), its value and three orders of derivatives, and its gradients pass the
    finite-difference check."""
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (sx, sw, sb))
    composed = (lambda *t: ad.relu(composed_affine(*t))) if relu else composed_affine
    for one, other in zip(third_order_derivatives(lambda *t: ad.affine(*t, relu=relu), (x, w, b)),
                          third_order_derivatives(composed, (x, w, b))):
        assert one.dtype == dtype
        np.testing.assert_array_equal(one, other)
    if relu:
        assert (ad.affine(x, w, b, relu=True).data == 0).any()  # the mask cuts somewhere
    if dtype == np.float64 and not relu:  # (finite differences across ReLU's kink would not agree)
        assert_grads(lambda *t: ad.tanh(ad.affine(*t)), [x, w, b])


@pytest.mark.parametrize("s_theta, s_g, s_lr", [((2, 3, 4), (2, 3, 4), None), ((2, 3, 4), (2, 3, 4), (3, 4)),
                                              ((3, 4), (2, 3, 4), (2, 1, 4)), ((2, 3), (2, 3), ())])
def test_gradient_step_is_its_composition_bit_for_bit(s_theta, s_g, s_lr):
    """``gradient_step`` (one node) gives the same bits as theta - lr * g, with lr a number (None here)
    or a Tensor that broadcasts (Meta-SGD's step sizes), through three orders of derivatives."""
    rng = np.random.default_rng(2)
    shapes = (s_theta, s_g) if s_lr is None else (s_theta, s_g, s_lr)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if s_lr is None:
        fused, composed = (lambda t, g: ad.gradient_step(t, g, 0.01)), (lambda t, g: t - 0.01 * g)
    else:
        fused, composed = ad.gradient_step, (lambda t, g, lr: t - lr * g)
    for one, other in zip(third_order_derivatives(fused, arrays), third_order_derivatives(composed, arrays)):
        assert one.dtype == np.float32
        np.testing.assert_array_equal(one, other)
    with pytest.raises(ShapeError, match=r"gradient_step: theta \(2, 3\), lr \(\) and g \(3, 2\) do not"):
        ad.gradient_step(np.ones((2, 3)), np.ones((3, 2)), 0.1)


def test_affine_with_relu_passes_the_finite_difference_check():
    """``affine(relu=True)``'s first and second derivatives against finite differences, at a point whose
    pre-activations all stay well away from ReLU's kink (so the differences do not cross it)."""
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 5))
    pre = ad.affine(x, w, b).data
    assert (pre > 0).any() and (pre < 0).any() and np.abs(pre).min() > 1e-2
    assert_grads(lambda *t: ad.tanh(ad.affine(*t, relu=True)), [x, w, b])


def test_affine_bias_that_does_not_fit():
    x, w = np.ones((3, 5, 2)), np.ones((3, 2, 4))
    for bias in (np.ones((3, 5)), np.ones((2, 4)), np.ones((3, 5, 4)), np.ones(())):
        with pytest.raises(ShapeError, match=r"affine: bias .* does not fit input \(3, 5, 2\)"):
            ad.affine(x, w, bias)


def test_swapaxes_out_of_range():
    with pytest.raises(ShapeError, match=r"swapaxes: axes 0 and 2 are out of range for shape \(2, 3\)"):
        ad.swapaxes(np.ones((2, 3)), 0, 2)


# --- the adjoint identity <A x, y> = <x, A^T y> of every linear operation ------------------------------------


def vjp_of(f, x, y):
    """A^T y for the linear map A = f, computed by the tape: the gradient of <f(x), y> in x."""
    t = leaf(x)
    (g,) = ad.grad(ad.sum(f(t) * const(y)), [t])
    return g.data


def assert_adjoint(f, f_adjoint, x, y):
    """<f(x), y> = <x, f_adjoint(y)> for the explicit adjoint, and the tape's VJP is that adjoint."""
    fx = f(const(x)).data
    assert fx.shape == y.shape
    lhs = float(np.sum(fx * y))
    at_y = f_adjoint(const(y)).data
    assert at_y.shape == x.shape
    rhs = float(np.sum(x * at_y))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs), np.sum(np.abs(fx * y)))
    np.testing.assert_allclose(vjp_of(f, x, y), at_y, rtol=1e-13, atol=1e-13)


@fast(30)
@given(st.data(), reshape_pairs())
def test_adjoint_reshape(data, pair):
    shape, new = pair
    x = data.draw(float_arrays(shape), label="x")
    new_shape = x.reshape(new).shape
    y = data.draw(float_arrays(new_shape), label="y")
    assert_adjoint(lambda t: ad.reshape(t, new), lambda t: ad.reshape(t, shape), x, y)


@fast(30)
@given(st.data(), shapes(min_dims=0, max_dims=4, max_side=3))
def test_adjoint_transpose(data, shape):
    perm = data.draw(st.permutations(list(range(len(shape)))).map(tuple), label="axes")
    inverse = tuple(np.argsort(perm))
    x = data.draw(float_arrays(shape), label="x")
    y = data.draw(float_arrays(np.transpose(x, perm).shape), label="y")
    assert_adjoint(lambda t: ad.transpose(t, perm), lambda t: ad.transpose(t, inverse), x, y)


@fast(40)
@given(st.data(), shapes(min_dims=1, max_dims=3, max_side=4))
def test_adjoint_getitem_scatter_add(data, shape):
    index = data.draw(integer_array_indices_with_repeats(shape) | hnp.basic_indices(shape)
                       | hnp.arrays(np.bool_, shape[:1]), label="index")
    x = data.draw(float_arrays(shape), label="x")
    y = data.draw(float_arrays(x[index].shape), label="y")
    assert_adjoint(lambda t: ad.getitem(t, index), lambda t: ad.scatter_add(t, index, shape), x, y)
    # and the other way round: scatter_add's adjoint is getitem
    assert_adjoint(lambda t: ad.scatter_add(t, index, shape), lambda t: ad.getitem(t, index), y, x)


@fast(30)
@given(st.data(), broadcast_to_pairs())
def test_adjoint_broadcast_to_sum(data, pair):
    source, target = pair
    lead = len(target) - len(source)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(source) if n == 1 and target[lead + i] != 1)

    def summed(t):  # the adjoint of broadcast_to: sum over the broadcast axes, back to ``source``
        return ad.reshape(ad.sum(t, axis=axes, keepdims=False), source)

    x = data.draw(float_arrays(source), label="x")
    y = data.draw(float_arrays(target), label="y")
    assert_adjoint(lambda t: ad.broadcast_to(t, target), summed, x, y)
    assert_adjoint(summed, lambda t: ad.broadcast_to(t, target), y, x)


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [ad.add, ad.subtract, ad.multiply, ad.divide, ad.maximum])
def test_broadcast_mismatch_names_op_and_shapes(op):
    with pytest.raises(ShapeError) as err:
        op(np.ones((2, 3)), np.ones((4,)))
    message = str(err.value)
    assert op.__name__ in message and "(2, 3)" in message and "(4,)" in message


def test_where_and_broadcast_to_mismatch():
    with pytest.raises(ShapeError, match=r"where.*\(2,\).*\(3,\)"):
        ad.where(np.array([True, False]), np.ones(3), np.ones(3))
    with pytest.raises(ShapeError, match=r"broadcast_to.*\(2, 3\).*\(3, 2\)"):
        ad.broadcast_to(np.ones((2, 3)), (3, 2))


@pytest.mark.parametrize("sa, sb", [((2, 3), (4, 5)), ((3, 2, 3), (2, 3, 4)), ((3,), (3, 3))])
def test_matmul_mismatch_names_op_and_shapes(sa, sb):
    with pytest.raises(ShapeError) as err:
        ad.matmul(np.ones(sa), np.ones(sb))
    message = str(err.value)
    assert "matmul" in message and str(sa) in message and str(sb) in message


def test_other_shape_errors():
    with pytest.raises(ShapeError, match="reshape"):
        ad.reshape(np.ones(6), (4, 2))
    with pytest.raises(ShapeError, match="transpose"):
        ad.transpose(np.ones((2, 3)), (0, 0))
    with pytest.raises(ShapeError, match="getitem"):
        ad.getitem(np.ones(3), np.array([5]))
    with pytest.raises(ShapeError, match="concatenate"):
        ad.concatenate([np.ones((2, 3)), np.ones((2, 4))], axis=0)
    with pytest.raises(ShapeError, match="axis"):
        ad.sum(np.ones((2, 3)), axis=2)
    with pytest.raises(TypeError, match="getitem"):
        ad.getitem(np.ones(3), (Tensor(np.array([0])),))
    with pytest.raises(TypeError, match="power"):
        ad.power(np.ones(3), "2")


MIXING = {
    "add": lambda a, b: ad.add(a, b),
    "subtract": lambda a, b: ad.subtract(a, b),
    "multiply": lambda a, b: ad.multiply(a, b),
    "divide": lambda a, b: ad.divide(a, b),
    "maximum": lambda a, b: ad.maximum(a, b),
    "where": lambda a, b: ad.where(np.ones(3, bool), a, b),
    "power": lambda a, b: ad.power(a, b),
    "matmul": lambda a, b: ad.matmul(ad.reshape(a, (3, 1)), ad.reshape(b, (1, 3))),
    "concatenate": lambda a, b: ad.concatenate([a, b]),
    "stack": lambda a, b: ad.stack([a, b]),
}


@pytest.mark.parametrize("name", list(MIXING))
@pytest.mark.parametrize("first", [np.float32, np.float64])
def test_mixing_float32_and_float64_raises_type_error_naming_the_op(name, first):
    second = np.float64 if first is np.float32 else np.float32
    a = Tensor(np.ones(3, first) * 2, requires_grad=True)
    b = Tensor(np.ones(3, second) * 2, requires_grad=True)
    with pytest.raises(TypeError) as err:
        MIXING[name](a, b)
    assert str(err.value).startswith(name), f"the message does not name {name!r}: {err.value}"


# --- dtypes: float32 stays float32, float64 stays float64 --------------------------------------------------

_rng = np.random.default_rng(1234)


def _pos(*shape):
    return _rng.uniform(0.5, 2.0, shape)


def _signed(*shape):
    return _rng.choice([-1.0, 1.0], shape) * _rng.uniform(0.3, 2.0, shape)


def _distinct(*shape):
    n = int(np.prod(shape))
    return (_rng.permutation(n) * 0.3 - n * 0.15 + 0.05).reshape(shape)


# (name, function of Tensors, float64 inputs kept away from every kink and pole)
OP_CASES = [
    ("add", lambda a, b: a + b, [_signed(2, 3), _signed(3)]),
    ("subtract", lambda a, b: a - b, [_signed(2, 1), _signed(3)]),
    ("multiply", lambda a, b: a * b, [_signed(2, 3), _signed(1, 3)]),
    ("divide", lambda a, b: a / b, [_signed(2, 3), _signed(3)]),
    ("negative", lambda a: -a, [_signed(4)]),
    ("power_int", lambda a: a ** 3, [_signed(4)]),
    ("power_real", lambda a: ad.power(a, 1.5), [_pos(4)]),
    ("power_scalar_types", lambda a: ad.power(a, np.float64(2.5)), [_pos(4)]),
    ("power_tensor", lambda a, p: a ** p, [_pos(2, 3), _signed(3)]),
    ("exp", ad.exp, [_signed(2, 2)]),
    ("log", ad.log, [_pos(2, 2)]),
    ("sqrt", ad.sqrt, [_pos(2, 2)]),
    ("tanh", ad.tanh, [_signed(2, 2)]),
    ("sigmoid", ad.sigmoid, [_signed(2, 2) * 3]),
    ("where", lambda a, b: ad.where(np.array([True, False, True]), a, b), [_signed(2, 3), _signed(3)]),
    ("relu", lambda a: ad.relu(a) * a, [_signed(5)]),
    ("maximum", lambda a, b: ad.maximum(a, b) * b, [_distinct(2, 3)[0], _distinct(3) + 0.1]),
    ("abs", lambda a: ad.abs(a) * a, [_signed(5)]),
    ("sum", lambda a: ad.sum(a * a, axis=(0, -1), keepdims=True), [_signed(2, 3, 2)]),
    ("mean", lambda a: ad.mean(a * a, axis=1), [_signed(2, 3, 2)]),
    ("max", lambda a: ad.max(a * a * a, axis=-1, keepdims=False), [_distinct(2, 3, 2)]),
    ("broadcast_to", lambda a: ad.broadcast_to(a, (2, 3, 4)) ** 2, [_signed(3, 1)]),
    ("reshape", lambda a: ad.reshape(a * a, (3, 2)), [_signed(2, 3)]),
    ("transpose", lambda a: ad.transpose(a * a, (2, 0, 1)), [_signed(2, 3, 2)]),
    ("swapaxes", lambda a: ad.swapaxes(a * a, 0, -1), [_signed(2, 3, 2)]),
    ("getitem_slices", lambda a: a[1:, ::-2] ** 2, [_signed(3, 4)]),
    ("getitem_ints", lambda a: a[1, 2] * a[0], [_signed(3, 4)]),
    ("getitem_int_array", lambda a: a[np.array([0, 2, 2, 0])] ** 2, [_signed(3, 4)]),
    ("getitem_bool_mask", lambda a: a[np.array([[True, False], [True, True]])] ** 2, [_signed(2, 2)]),
    ("scatter_add", lambda v: ad.scatter_add(v * v, np.array([1, 1, 0]), (3, 2)), [_signed(3, 2)]),
    ("concatenate", lambda a, b: ad.concatenate([a * b, b], axis=1), [_signed(2, 3), _signed(2, 3)]),
    ("stack", lambda a, b: ad.stack([a * b, a], axis=-1), [_signed(2, 3), _signed(2, 3)]),
    ("matmul", lambda a, b: ad.tanh(a @ b), [_signed(4, 2, 3), _signed(1, 3, 2)]),
]


@pytest.mark.parametrize("name, f, arrays", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_table_gradients(name, f, arrays):
    assert_grads(f, arrays, order=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, f, arrays", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_dtype_is_preserved_forward_and_backward(name, f, arrays, dtype):
    assert_dtype_preserved(f, arrays, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name, f, arrays", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_table_gradients_on_gpu(gpu, name, f, arrays):
    to_gpu_and_check(gpu, f, arrays, order=2)
