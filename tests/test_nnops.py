"""``minimaml.autodiff.nnops``: im2col/col2im, conv2d, max_pool2x2, logsumexp, log_softmax, mse and
softmax_cross_entropy. Forward values against naive NumPy references, first- and second-order derivatives
against finite differences (relative error <= 1e-6) over hypothesis-drawn sizes, strides, paddings,
task and batch axes; the adjoint identity of im2col/col2im; dtypes; shape errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import (assert_dtype_preserved, assert_grads, distinct_arrays, fast, float_arrays, shapes,
                      to_gpu_and_check)
from minimaml import autodiff as ad
from minimaml import parallel
from minimaml.autodiff import ShapeError, Tensor, kernels, nnops

# --- naive references ---------------------------------------------------------------------------------


def resolve_padding(padding, h, w, kh, kw, stride):
    if padding == "SAME":
        return ad.same_padding(h, kh, stride), ad.same_padding(w, kw, stride)
    if padding == "VALID":
        return (0, 0), (0, 0)
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    return tuple(tuple(p) for p in padding)


def im2col_reference(x, kh, kw, stride, padding):
    *lead, h, w, c = x.shape
    (t, b), (l, r) = padding
    xp = np.pad(x, [(0, 0)] * len(lead) + [(t, b), (l, r), (0, 0)])
    ho = (h + t + b - kh) // stride + 1
    wo = (w + l + r - kw) // stride + 1
    out = np.zeros((*lead, ho, wo, kh * kw * c))
    for p in range(ho):
        for q in range(wo):
            patch = xp[..., p * stride:p * stride + kh, q * stride:q * stride + kw, :]
            out[..., p, q, :] = patch.reshape(*lead, kh * kw * c)
    return out


def conv2d_reference(x, w, stride, padding):
    """Direct loops: out[..., p, q, o] = sum_{i,j,c} x_pad[..., s p + i, s q + j, c] w[..., i, j, c, o]."""
    task = w.shape[:-4]
    kh, kw, c_in, c_out = w.shape[-4:]
    h, wd = x.shape[-3], x.shape[-2]
    (t, b), (l, r) = resolve_padding(padding, h, wd, kh, kw, stride)
    xp = np.pad(x, [(0, 0)] * (x.ndim - 3) + [(t, b), (l, r), (0, 0)])
    ho = (h + t + b - kh) // stride + 1
    wo = (wd + l + r - kw) // stride + 1
    n_batch = x.ndim - 3 - len(task)
    # w broadcast over the batch axes of x
    wb = w.reshape(task + (1,) * n_batch + (kh, kw, c_in, c_out))
    out = np.zeros(x.shape[:-3] + (ho, wo, c_out))
    for p in range(ho):
        for q in range(wo):
            acc = 0.0
            for i in range(kh):
                for j in range(kw):
                    pix = xp[..., stride * p + i, stride * q + j, :]  # (..., c_in)
                    acc = acc + np.einsum("...c,...co->...o", pix, wb[..., i, j, :, :])
            out[..., p, q, :] = acc
    return out


def max_pool_reference(x):
    *lead, h, w, c = x.shape
    out = np.empty((*lead, h // 2, w // 2, c))
    for p in range(h // 2):
        for q in range(w // 2):
            out[..., p, q, :] = x[..., 2 * p:2 * p + 2, 2 * q:2 * q + 2, :].max(axis=(-3, -2))
    return out


# --- strategies -----------------------------------------------------------------------------------------


@st.composite
def im2col_setups(draw):
    """(image shape, kh, kw, stride, explicit padding) with at least one output pixel."""
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=2))
    h, w, c = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 2))
    stride = draw(st.sampled_from([1, 2]))
    pads = [draw(st.integers(0, 2)) for _ in range(4)]
    kh = draw(st.integers(1, min(3, h + pads[0] + pads[1])))
    kw = draw(st.integers(1, min(3, w + pads[2] + pads[3])))
    return tuple(lead) + (h, w, c), kh, kw, stride, ((pads[0], pads[1]), (pads[2], pads[3]))


@st.composite
def conv_setups(draw):
    """(x shape, w shape, stride, padding) over every padding kind, with or without a task axis on the
    filters, with 0-2 batch axes."""
    task = draw(st.sampled_from([(), (2,)]))
    batch = tuple(draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=2)))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    c_in, c_out = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    stride = draw(st.sampled_from([1, 2]))
    kind = draw(st.sampled_from(["SAME", "VALID", "int", "explicit"]))
    if kind == "SAME":
        padding, pads = "SAME", (0, 0, 0, 0)  # any kernel fits with SAME
        kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    else:
        if kind == "VALID":
            padding, pads = "VALID", (0, 0, 0, 0)
        elif kind == "int":
            p = draw(st.integers(0, 2))
            padding, pads = p, (p, p, p, p)
        else:
            pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
            padding = ((pads[0], pads[1]), (pads[2], pads[3]))
        kh = draw(st.integers(1, min(3, h + pads[0] + pads[1])))
        kw = draw(st.integers(1, min(3, w + pads[2] + pads[3])))
    return task + batch + (h, w, c_in), task + (kh, kw, c_in, c_out), stride, padding


# --- im2col / col2im ------------------------------------------------------------------------------------


@fast(40)
@given(st.data(), im2col_setups())
def test_im2col_col2im(data, setup):
    shape, kh, kw, stride, padding = setup
    x = data.draw(float_arrays(shape), label="x")
    cols = ad.im2col(x, kh, kw, stride, padding)
    np.testing.assert_array_equal(cols.data, im2col_reference(x, kh, kw, stride, padding))
    y = data.draw(float_arrays(cols.shape), label="y")
    back = ad.col2im(y, shape, kh, kw, stride, padding)
    assert back.shape == shape
    assert_grads(lambda t: ad.im2col(t, kh, kw, stride, padding), [x])
    assert_grads(lambda t: ad.im2col(t * t, kh, kw, stride, padding) * ad.im2col(t, kh, kw, stride, padding), [x])
    assert_grads(lambda t: ad.col2im(t, shape, kh, kw, stride, padding), [y])
    assert_grads(lambda t: ad.col2im(ad.tanh(t), shape, kh, kw, stride, padding) ** 2, [y])


@fast(40)
@given(st.data(), im2col_setups())
def test_adjoint_im2col_col2im(data, setup):
    """<im2col(x), y> = <x, col2im(y)>, and each is the other's VJP on the tape."""
    shape, kh, kw, stride, padding = setup
    x = data.draw(float_arrays(shape), label="x")
    cols = ad.im2col(x, kh, kw, stride, padding).data
    y = data.draw(float_arrays(cols.shape), label="y")
    back = ad.col2im(y, shape, kh, kw, stride, padding).data
    lhs, rhs = float(np.sum(cols * y)), float(np.sum(x * back))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, float(np.sum(np.abs(cols * y))))
    # the tape's VJP of im2col is col2im, and of col2im is im2col
    tx = Tensor(x, requires_grad=True)
    (g,) = ad.grad(ad.sum(ad.im2col(tx, kh, kw, stride, padding) * Tensor(y)), [tx])
    np.testing.assert_allclose(g.data, back, rtol=1e-13, atol=1e-13)
    ty = Tensor(y, requires_grad=True)
    (g,) = ad.grad(ad.sum(ad.col2im(ty, shape, kh, kw, stride, padding) * Tensor(x)), [ty])
    np.testing.assert_allclose(g.data, cols, rtol=1e-13, atol=1e-13)


# --- conv2d ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, kernel, stride, expected", [
    (5, 3, 1, (1, 1)), (5, 3, 2, (1, 1)), (6, 3, 2, (0, 1)), (4, 2, 1, (0, 1)), (1, 3, 1, (1, 1)),
    (7, 1, 2, (0, 0)), (28, 3, 2, (0, 1))])
def test_same_padding_matches_tensorflow(size, kernel, stride, expected):
    assert ad.same_padding(size, kernel, stride) == expected
    out = (size + sum(expected) - kernel) // stride + 1
    assert out == -(-size // stride)


@fast(60)
@given(st.data(), conv_setups())
def test_conv2d(data, setup):
    xs, ws, stride, padding = setup
    x = data.draw(float_arrays(xs), label="x")
    w = data.draw(float_arrays(ws), label="w")
    out = ad.conv2d(x, w, stride=stride, padding=padding)
    np.testing.assert_allclose(out.data, conv2d_reference(x, w, stride, padding), rtol=1e-12, atol=1e-12)
    if padding == "SAME":
        assert out.shape[-3:-1] == (-(-xs[-3] // stride), -(-xs[-2] // stride))
    assert_grads(lambda a, b: ad.conv2d(a, b, stride=stride, padding=padding), [x, w])
    assert_grads(lambda a, b: ad.tanh(ad.conv2d(a, b, stride=stride, padding=padding)), [x, w])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID", 1, ((0, 2), (1, 0))])
@pytest.mark.parametrize("task", [False, True])
def test_conv2d_every_configuration(stride, padding, task):
    """Every combination named in the acceptance list, on a fixed 2-image batch of 5x6 images."""
    rng = np.random.default_rng(7)
    t = (3,) if task else ()
    x = rng.standard_normal(t + (2, 5, 6, 2))
    w = rng.standard_normal(t + (3, 3, 2, 3))
    out = ad.conv2d(x, w, stride=stride, padding=padding)
    np.testing.assert_allclose(out.data, conv2d_reference(x, w, stride, padding), rtol=1e-12, atol=1e-12)
    assert_grads(lambda a, b: ad.conv2d(a, b, stride=stride, padding=padding) ** 2, [x, w])


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("block_bytes", [1, 700, 1 << 20], ids=["one_image", "image_ranges", "whole_tasks"])
@pytest.mark.parametrize("task", [False, True])
def test_conv2d_blockwise_passes_to_third_order(monkeypatch, block_bytes, task, threads):
    """The convolution and its two derivative primitives (input and filter gradient), run a block of
    images at a time: single images, ranges that do not divide the batch, several whole tasks per
    block; the blocks on one thread or shared out over three. Values against the reference,
    derivatives to third order against finite differences."""
    monkeypatch.setattr(kernels, "BLOCK_BYTES_CONV", block_bytes)
    monkeypatch.setenv("MINIMAML_THREADS", threads)
    monkeypatch.setattr(parallel, "SHARE_MIN_BYTES", 0)  # share out even these small arrays
    rng = np.random.default_rng(3)
    t = (3,) if task else ()
    x = rng.standard_normal(t + (5, 5, 4, 2))
    w = rng.standard_normal(t + (3, 2, 2, 3))
    out = ad.conv2d(x, w, stride=2, padding="SAME")
    np.testing.assert_allclose(out.data, conv2d_reference(x, w, 2, "SAME"), rtol=1e-12, atol=1e-12)
    assert_grads(lambda a, b: ad.conv2d(a, b, stride=2, padding="SAME") ** 2, [x, w], order=3)


def test_conv2d_task_axis_uses_each_tasks_own_filters():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 5, 5, 1))
    w = rng.standard_normal((2, 3, 3, 1, 2))
    out = ad.conv2d(x, w).data
    for t in range(2):
        np.testing.assert_allclose(out[t], ad.conv2d(x[t], w[t]).data, rtol=1e-14)


# --- max_pool2x2 --------------------------------------------------------------------------------------------


@st.composite
def pool_shapes(draw):
    lead = tuple(draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=2)))
    return lead + (draw(st.integers(2, 5)), draw(st.integers(2, 5)), draw(st.integers(1, 2)))


@fast(40)
@given(distinct_arrays(pool_shapes(), gap=0.1))  # entries at least 0.1 apart: no ties in any window
def test_max_pool2x2(x):
    out = ad.max_pool2x2(x)
    np.testing.assert_array_equal(out.data, max_pool_reference(x))
    assert_grads(ad.max_pool2x2, [x])
    assert_grads(lambda t: ad.max_pool2x2(t * t * t) * ad.max_pool2x2(t), [x])


@pytest.mark.parametrize("h, w", [(4, 4), (5, 5), (4, 5), (5, 4), (2, 3), (3, 2)])
def test_max_pool2x2_even_and_odd_sizes(h, w):
    rng = np.random.default_rng(h * 10 + w)
    x = (rng.permutation(2 * h * w * 3) * 0.1).reshape(2, h, w, 3)
    out = ad.max_pool2x2(x)
    assert out.shape == (2, h // 2, w // 2, 3)
    np.testing.assert_array_equal(out.data, max_pool_reference(x))
    t = Tensor(x, requires_grad=True)
    (g,) = ad.grad(ad.sum(ad.max_pool2x2(t)), [t])
    # one 1 per pooling window, and nothing from the dropped odd row / column
    assert g.data.sum() == 2 * (h // 2) * (w // 2) * 3
    assert np.all(g.data[:, 2 * (h // 2):] == 0) and np.all(g.data[:, :, 2 * (w // 2):] == 0)
    assert_grads(lambda a: ad.max_pool2x2(a) ** 2, [x])


# --- logsumexp, log_softmax, losses ----------------------------------------------------------------------------


@fast(40)
@given(st.data(), shapes(min_dims=1, max_dims=3, max_side=4), st.booleans())
def test_logsumexp(data, shape, keepdims):
    x = data.draw(float_arrays(shape, -3.0, 3.0), label="x")
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    expected = np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims))
    np.testing.assert_allclose(ad.logsumexp(x, axis, keepdims).data, expected, rtol=1e-13, atol=1e-14)
    assert_grads(lambda t: ad.logsumexp(t, axis, keepdims), [x])
    assert_grads(lambda t: ad.logsumexp(t * t, axis, keepdims) ** 2, [x])


@fast(40)
@given(st.data(), shapes(min_dims=1, max_dims=3, max_side=4))
def test_log_softmax(data, shape):
    x = data.draw(float_arrays(shape, -3.0, 3.0), label="x")
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    out = ad.log_softmax(x, axis).data
    np.testing.assert_allclose(out, x - np.log(np.sum(np.exp(x), axis=axis, keepdims=True)),
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.exp(out).sum(axis=axis), 1.0, rtol=1e-13)
    assert_grads(lambda t: ad.log_softmax(t, axis), [x])


def test_logsumexp_and_log_softmax_are_stable():
    x = np.array([[1000.0, 1000.0, -1000.0], [-1000.0, -1001.0, -1002.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        lse = ad.logsumexp(x).data
        ls = ad.log_softmax(x).data
        t = Tensor(x, requires_grad=True)
        (g,) = ad.grad(ad.sum(ad.logsumexp(t)), [t])
    np.testing.assert_allclose(lse, [1000 + np.log(2), -1000 + np.log(1 + np.exp(-1) + np.exp(-2))])
    assert np.all(np.isfinite(ls))
    np.testing.assert_allclose(g.data.sum(axis=-1), 1.0)


@st.composite
def loss_shapes(draw):
    """(..., N, D): 0-2 task axes, N examples, D outputs."""
    return tuple(draw(hnp.array_shapes(min_dims=2, max_dims=4, max_side=3)))


@fast(40)
@given(st.data(), loss_shapes())
def test_mse(data, shape):
    p = data.draw(float_arrays(shape), label="prediction")
    y = data.draw(float_arrays(shape), label="target")
    out = ad.mse(p, y)
    assert out.shape == shape[:-2]
    np.testing.assert_allclose(out.data, np.mean((p - y) ** 2, axis=(-2, -1)), rtol=1e-14, atol=1e-15)
    assert_grads(ad.mse, [p, y])
    assert_grads(lambda a, b: ad.mse(ad.tanh(a), b), [p, y])


@fast(25)
@given(st.data(), loss_shapes())
def test_mean_square_is_the_recorded_mean_of_squares_bit_for_bit(data, shape):
    """The fused primitive against mean(d * d) recorded op by op, in float32: the value, the gradient
    and a second-order product (the gradient of <gradient, v>) are the same bits."""
    a = data.draw(float_arrays(shape), label="a").astype(np.float32)
    y = data.draw(float_arrays(shape), label="y").astype(np.float32)
    v = data.draw(float_arrays(shape), label="v").astype(np.float32)

    def through(mean_of_squares):
        x = Tensor(a, requires_grad=True)
        d = ad.tanh(x) - Tensor(y)
        loss = ad.sum(mean_of_squares(d))
        (g,) = ad.grad(loss, [x], create_graph=True)
        (h,) = ad.grad(ad.sum(g * Tensor(v)), [x])
        return loss.data, g.data, h.data

    fused = through(nnops.mean_square)
    recorded = through(lambda d: ad.mean(d * d, axis=(-2, -1)))
    for one, other in zip(fused, recorded):
        assert one.dtype == np.float32
        np.testing.assert_array_equal(one, other)


@fast(40)
@given(st.data(), loss_shapes())
def test_softmax_cross_entropy(data, shape):
    logits = data.draw(float_arrays(shape, -3.0, 3.0), label="logits")
    labels = data.draw(hnp.arrays(np.int64, shape[:-1], elements=st.integers(0, shape[-1] - 1)), label="labels")
    out = ad.softmax_cross_entropy(logits, labels)
    assert out.shape == shape[:-2]
    log_p = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0], axis=-1)
    np.testing.assert_allclose(out.data, expected, rtol=1e-13, atol=1e-14)
    assert_grads(lambda t: ad.softmax_cross_entropy(t, labels), [logits])
    assert_grads(lambda t: ad.softmax_cross_entropy(t * t, Tensor(labels)), [logits])


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xs, ws", [
    ((2, 5, 5, 3), (3, 3, 2, 4)),        # channels differ
    ((2, 4, 5, 5, 1), (3, 3, 3, 1, 2)),  # task axes differ
    ((5, 5, 1), (3, 3, 1)),               # filters with 3 dimensions
    ((5, 1), (3, 3, 1, 2)),               # images without a channel axis
])
def test_conv2d_shape_mismatch_names_op_and_both_shapes(xs, ws):
    with pytest.raises(ShapeError) as err:
        ad.conv2d(np.ones(xs), np.ones(ws))
    message = str(err.value)
    assert "conv2d" in message and str(xs) in message and str(ws) in message


def test_conv2d_kernel_larger_than_valid_image():
    with pytest.raises(ShapeError):
        ad.conv2d(np.ones((2, 2, 1)), np.ones((3, 3, 1, 1)), padding="VALID")


def test_other_nnops_errors():
    with pytest.raises(ShapeError, match=r"mse.*\(2, 3\).*\(3, 2\)"):
        ad.mse(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ShapeError, match=r"mse: expected prediction and target \(\.\.\., N, D\), got shape \(3,"):
        ad.mse(np.ones(3), np.ones(3))
    with pytest.raises(ShapeError, match=r"mean_square: expected \(\.\.\., N, D\)"):
        nnops.mean_square(np.ones(3))
    with pytest.raises(ShapeError, match="softmax_cross_entropy"):
        ad.softmax_cross_entropy(np.ones((2, 3)), np.zeros(3, dtype=np.int64))
    with pytest.raises(TypeError, match=r"expected integer class labels of shape \(2,\), got float64"):
        ad.softmax_cross_entropy(np.ones((2, 3)), np.zeros(2))
    with pytest.raises(ShapeError, match="max_pool2x2"):
        ad.max_pool2x2(np.ones((1, 4, 1)))
    with pytest.raises(ShapeError, match="im2col"):
        ad.im2col(np.ones((2, 2, 1)), 3, 3, 1, ((0, 0), (0, 0)))


@pytest.mark.parametrize("labels, bad", [
    (np.full((2, 5), 9), r"\[9\]"),
    (np.array([[0, 1, 7, 2, 3], [4, -1, 0, 1, 2]]), r"\[-1, 7\]"),
    (np.array([[0, 1, 2, 3, 5]] * 2, dtype=np.uint8), r"\[5\]"),
])
def test_softmax_cross_entropy_refuses_labels_outside_the_classes(labels, bad):
    with pytest.raises(ValueError, match=rf"labels {bad} are outside the valid range \[0, 5\)"):
        ad.softmax_cross_entropy(np.zeros((2, 5, 5)), labels)
    ad.softmax_cross_entropy(np.zeros((2, 5, 5)), np.clip(labels, 0, 4))  # in range: accepted


@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_softmax_cross_entropy_one_hot_labels_name_the_expected_shape(dtype):
    one_hot_labels = np.eye(3, dtype=dtype)[np.zeros((2, 5), dtype=np.int64)]
    with pytest.raises(ShapeError, match=r"expected integer class labels of shape \(2, 5\)") as err:
        ad.softmax_cross_entropy(np.zeros((2, 5, 3)), one_hot_labels)
    assert ("float32" in str(err.value)) == (dtype == np.float32)
    assert "one-hot" in str(err.value)


@pytest.mark.gpu
def test_softmax_cross_entropy_refuses_out_of_range_labels_on_gpu(gpu):
    with pytest.raises(ValueError, match=r"labels \[-1, 9\] are outside"):
        ad.softmax_cross_entropy(gpu.zeros((2, 5, 5)), gpu.asarray([[0, 9, 1, 2, 3], [-1, 0, 1, 2, 3]]))


@pytest.mark.parametrize("name", ["conv2d", "mse"])
def test_nnops_dtype_mixing_names_the_op(name):
    a32 = Tensor(np.ones((4, 4, 1), np.float32), requires_grad=True)
    b64 = np.ones((3, 3, 1, 1)) if name == "conv2d" else np.ones((4, 4, 1))
    with pytest.raises(TypeError, match=f"^{name}"):
        getattr(ad, name)(a32, b64)


# --- dtype preservation and the GPU, over a fixed table of cases ---------------------------------------------

_rng = np.random.default_rng(99)
_labels = np.array([[0, 2, 1], [1, 1, 0]])

NN_CASES = [
    ("im2col", lambda x: ad.im2col(x, 2, 3, 2, ((1, 0), (0, 2))) ** 2, [_rng.standard_normal((2, 5, 4, 2))]),
    ("col2im", lambda c: ad.col2im(c * c, (2, 5, 4, 2), 2, 3, 2, ((1, 0), (0, 2))),
     [_rng.standard_normal((2, 3, 2, 12))]),
    ("conv2d_same_s1", lambda x, w: ad.conv2d(x, w) ** 2, [_rng.standard_normal((2, 5, 5, 2)),
                                                            _rng.standard_normal((3, 3, 2, 2))]),
    ("conv2d_valid_s2_task", lambda x, w: ad.tanh(ad.conv2d(x, w, 2, "VALID")),
     [_rng.standard_normal((2, 3, 6, 5, 1)), _rng.standard_normal((2, 3, 3, 1, 2))]),
    ("conv2d_int_pad", lambda x, w: ad.conv2d(x, w, 1, 1) ** 2, [_rng.standard_normal((4, 4, 1)),
                                                                 _rng.standard_normal((2, 2, 1, 2))]),
    ("conv2d_explicit_pad_s2", lambda x, w: ad.conv2d(x, w, 2, ((0, 1), (2, 0))) ** 2,
     [_rng.standard_normal((2, 5, 4, 2)), _rng.standard_normal((3, 2, 2, 1))]),
    ("max_pool2x2_odd", lambda x: ad.max_pool2x2(x * x * x),
     [(_rng.permutation(2 * 5 * 3 * 2) * 0.1 - 2.9).reshape(2, 5, 3, 2)]),
    ("logsumexp", lambda x: ad.logsumexp(x * x, axis=0), [_rng.standard_normal((3, 4))]),
    ("log_softmax", lambda x: ad.log_softmax(x * x), [_rng.standard_normal((3, 4))]),
    ("mse", lambda p, y: ad.mse(ad.tanh(p), y), [_rng.standard_normal((2, 3, 2)), _rng.standard_normal((2, 3, 2))]),
    ("softmax_cross_entropy", lambda z: ad.softmax_cross_entropy(z * z, _labels), [_rng.standard_normal((2, 3, 3))]),
]


@pytest.mark.parametrize("name, f, arrays", NN_CASES, ids=[c[0] for c in NN_CASES])
def test_nn_table_gradients(name, f, arrays):
    assert_grads(f, arrays, order=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, f, arrays", NN_CASES, ids=[c[0] for c in NN_CASES])
def test_nn_dtype_is_preserved_forward_and_backward(name, f, arrays, dtype):
    assert_dtype_preserved(f, arrays, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name, f, arrays", NN_CASES, ids=[c[0] for c in NN_CASES])
def test_nn_table_gradients_on_gpu(gpu, name, f, arrays):
    if name == "softmax_cross_entropy":
        labels = gpu.asarray(_labels)
        f = lambda z: ad.softmax_cross_entropy(z * z, labels)  # noqa: E731 - labels on the GPU too
    to_gpu_and_check(gpu, f, arrays, order=2)


# --- batch norm's primitives: channel_dot, channel_scale, batch_normalize ------------------------------------

CHANNEL_CASES = [
    ("channel_dot", lambda a, b: nnops.channel_dot(ad.tanh(a), b * b), [_rng.standard_normal((2, 4, 3)),
                                                                         _rng.standard_normal((2, 4, 3))]),
    ("channel_dot_square", lambda a: nnops.channel_dot(a, a) * nnops.channel_dot(a, a),
     [_rng.standard_normal((2, 5, 3))]),
    ("channel_scale_task", lambda x, s: nnops.channel_scale(x * x, ad.tanh(s)),
     [_rng.standard_normal((2, 4, 3)), _rng.standard_normal((2, 1, 3))]),
    ("channel_scale_shared", lambda x, s: nnops.channel_scale(ad.tanh(x), s * s),
     [_rng.standard_normal((2, 4, 3)), _rng.standard_normal((3,))]),
    ("batch_normalize_per_task", lambda x, s, b: nnops.batch_normalize(x * x, ad.tanh(s), b * b, eps=1e-3),
     [_rng.standard_normal((2, 6, 3)), _rng.standard_normal((2, 1, 3)), _rng.standard_normal((2, 1, 3))]),
    ("batch_normalize_shared", lambda x, s, b: nnops.batch_normalize(ad.tanh(x), s * s, b, eps=1e-5),
     [_rng.standard_normal((2, 3, 5, 4)), _rng.standard_normal((4,)), _rng.standard_normal((1, 1, 4))]),
    ("batch_normalize_no_scale_no_shift", lambda x: nnops.batch_normalize(ad.tanh(x), eps=1e-3) ** 3,
     [_rng.standard_normal((7, 2))]),
    ("batch_normalize_relu", lambda x, s, b: nnops.batch_normalize(x * x, s, b, eps=1e-3, relu=True) ** 2,
     [_rng.standard_normal((2, 6, 3)), _rng.standard_normal((2, 1, 3)), _rng.standard_normal((3,)) * 0.3]),
]


@pytest.mark.parametrize("name, f, arrays", CHANNEL_CASES, ids=[c[0] for c in CHANNEL_CASES])
def test_channel_ops_gradients_to_third_order(name, f, arrays):
    assert_grads(f, arrays, order=3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, f, arrays", CHANNEL_CASES, ids=[c[0] for c in CHANNEL_CASES])
def test_channel_ops_preserve_dtype(name, f, arrays, dtype):
    assert_dtype_preserved(f, arrays, dtype)


def test_channel_ops_values_and_errors():
    a, b = _rng.standard_normal((2, 3, 5, 4)), _rng.standard_normal((2, 3, 5, 4))
    np.testing.assert_allclose(nnops.channel_dot(a, b).data, np.sum(a * b, axis=-2, keepdims=True), rtol=1e-13)
    s = _rng.standard_normal((2, 3, 1, 4))
    np.testing.assert_array_equal(nnops.channel_scale(a, s).data, a * s)
    with pytest.raises(ShapeError, match="channel_dot"):
        nnops.channel_dot(a, b[..., :3])
    with pytest.raises(ShapeError, match="channel_scale"):
        nnops.channel_scale(a, _rng.standard_normal((2, 3, 5, 4)))


@pytest.mark.gpu
@pytest.mark.parametrize("name, f, arrays", CHANNEL_CASES, ids=[c[0] for c in CHANNEL_CASES])
def test_channel_ops_gradients_on_gpu(gpu, name, f, arrays):
    to_gpu_and_check(gpu, f, arrays, order=2)


# --- batch_normalize (batch norm with the batch's statistics, one primitive) --------------------------------


def batch_normalize_reference(x, scale, shift, eps):
    mean = x.mean(axis=-2, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-2, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    return y * (1 if scale is None else scale) + (0 if shift is None else shift)


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("block_bytes", [8, 100, 1 << 20], ids=["rows", "row_ranges", "slabs"])
def test_batch_normalize_blocks_and_both_reverse_passes_agree(monkeypatch, block_bytes, relu, threads):
    """Forward values against the formula, and the blockwise array VJP (a reverse pass that is not
    recorded) against the taped VJP (recorded), with blocks of single rows, row ranges that do not
    divide P, and whole slabs, on one thread or three; with and without the ReLU."""
    monkeypatch.setattr(kernels, "BLOCK_BYTES", block_bytes)
    monkeypatch.setenv("MINIMAML_THREADS", threads)
    monkeypatch.setattr(parallel, "SHARE_MIN_BYTES", 0)  # share out even these small arrays
    x = _rng.standard_normal((3, 2, 9, 4)) * 3 + 1
    scale, shift = _rng.standard_normal((3, 1, 1, 4)), _rng.standard_normal((4,))
    cotangent = Tensor(_rng.standard_normal(x.shape))
    leaves = [Tensor(a, requires_grad=True) for a in (x, scale, shift)]
    y = nnops.batch_normalize(*leaves, eps=1e-3, relu=relu)
    expected = batch_normalize_reference(x, scale, shift, 1e-3)
    np.testing.assert_allclose(y.data, np.maximum(expected, 0) if relu else expected, rtol=1e-12, atol=1e-12)
    assert (y.data == 0).any() == relu
    untaped = ad.grad(ad.sum(y * cotangent), leaves, create_graph=False)
    taped = ad.grad(ad.sum(y * cotangent), leaves, create_graph=True)
    assert all(not g.requires_grad for g in untaped) and taped[0].requires_grad
    for a, b in zip(untaped, taped):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.data, b.data, rtol=1e-10, atol=1e-12)


def test_batch_normalize_errors():
    x = _rng.standard_normal((2, 5, 3))
    with pytest.raises(ShapeError, match="examples axis"):
        nnops.batch_normalize(np.ones(3))
    with pytest.raises(ShapeError, match=r"scale \(2, 5, 3\) must be per channel"):
        nnops.batch_normalize(x, scale=x)
    with pytest.raises(ShapeError, match=r"shift \(4,\)"):
        nnops.batch_normalize(x, shift=np.ones(4))
    with pytest.raises(ShapeError, match=r"scale \(3, 1, 3\)"):
        nnops.batch_normalize(x, scale=np.ones((3, 1, 3)))
    with pytest.raises(TypeError, match="scale is float32, the input is float64"):
        nnops.batch_normalize(x, scale=np.ones(3, dtype=np.float32))
