"""The fast array kernels (``autodiff/kernels.py``) against their plain reference versions, in float64,
on shapes and block sizes that exercise every path: padding on each side, strides, blocks of single
images, ranges that do not divide the batch and whole slabs, one thread or three."""

from __future__ import annotations

import numpy as np
import pytest

from minimaml import parallel
from minimaml.autodiff import kernels

_rng = np.random.default_rng(26)

GEOMETRIES = [  # (kh, kw, stride, padding, (h, w))
    (3, 3, 1, ((1, 1), (1, 1)), (5, 6)),
    (3, 3, 2, ((0, 1), (0, 1)), (7, 5)),   # TensorFlow's SAME with stride 2: the extra zero at the end
    (3, 2, 2, ((1, 1), (0, 0)), (6, 5)),
    (2, 2, 1, ((0, 0), (0, 0)), (4, 4)),   # VALID
    (3, 3, 3, ((2, 2), (2, 2)), (4, 4)),   # padding wider than a stride: whole border rows read zeros
]


@pytest.fixture(params=[("1", 1 << 20), ("1", 1), ("3", 700)], ids=["whole", "one_image_blocks", "shared_ranges"])
def blocking(request, monkeypatch):
    """Run a test's kernels whole, a single image per block, or in ranges shared over three threads
    (batch norm's elementwise steps in chunks of one or two rows)."""
    threads, block_bytes = request.param
    monkeypatch.setenv("MINIMAML_THREADS", threads)
    monkeypatch.setattr(kernels, "BLOCK_BYTES_CONV", block_bytes)
    monkeypatch.setattr(kernels, "BLOCK_BYTES", max(8, block_bytes // 64))
    monkeypatch.setattr(kernels, "CHUNK_BYTES", max(8, block_bytes // 5000))
    monkeypatch.setattr(parallel, "SHARE_MIN_BYTES", 0)  # share out even these small arrays


@pytest.mark.parametrize("kh, kw, stride, padding, hw", GEOMETRIES)
def test_im2col_and_col2im_match_the_padded_copy(blocking, kh, kw, stride, padding, hw):
    geometry = kernels.Geometry(kh, kw, stride, padding, hw)
    x = _rng.standard_normal((2, 3, *hw, 4))
    cols = kernels.im2col(x, geometry)
    np.testing.assert_array_equal(cols, kernels.reference_im2col(x, geometry))  # copies: exactly equal
    back = kernels.col2im(cols, x.shape, geometry)
    np.testing.assert_allclose(back, kernels.reference_col2im(cols, x.shape, geometry), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kh, kw, stride, padding, hw", GEOMETRIES)
def test_convolution_kernels_match_the_whole_product(blocking, kh, kw, stride, padding, hw):
    geometry = kernels.Geometry(kh, kw, stride, padding, hw)
    c_in, c_out = 3, 4
    x5 = _rng.standard_normal((2, 5, *hw, c_in))
    w3 = _rng.standard_normal((2, kh * kw * c_in, c_out))
    g5 = _rng.standard_normal((2, 5, geometry.ho, geometry.wo, c_out))
    pairs = [(kernels.conv(x5, w3, geometry), kernels.reference_conv(x5, w3, geometry)),
             (kernels.conv_input_grad(g5, w3, geometry, c_in),
              kernels.reference_conv_input_grad(g5, w3, geometry, c_in)),
             (kernels.conv_filter_grad(x5, g5, geometry), kernels.reference_conv_filter_grad(x5, g5, geometry))]
    for fast, reference in pairs:
        assert fast.shape == reference.shape
        np.testing.assert_allclose(fast, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_scale, with_shift", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_and_its_vjp_match_the_formula(blocking, relu, with_scale, with_shift):
    x3 = _rng.standard_normal((3, 11, 4)) * 3 + 1
    scale3 = _rng.standard_normal((3, 1, 4)) if with_scale else None
    shift3 = _rng.standard_normal((3, 1, 4)) if with_shift else None
    g3 = _rng.standard_normal(x3.shape)
    fast = kernels.batch_norm(x3, scale3, shift3, 1e-3, relu)
    reference = kernels.reference_batch_norm(x3, scale3, shift3, 1e-3, relu)
    for a, b in zip(fast, reference):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    y3, mean, inv_std, a = fast
    assert (y3 == 0).any() == relu
    relu_output = y3 if relu else None
    for d_fast, d_reference in zip(kernels.batch_norm_vjp(g3, x3, relu_output, mean, inv_std, a),
                                   kernels.reference_batch_norm_vjp(g3, x3, relu_output, mean, inv_std, a)):
        assert d_fast.shape == d_reference.shape
        np.testing.assert_allclose(d_fast, d_reference, rtol=1e-11, atol=1e-12)


def test_small_passes_give_the_same_bits_in_blocks_of_whole_slabs(monkeypatch):
    """A pass on one thread under ``SHARE_MIN_BYTES`` is cut into blocks of whole slabs: each slab's sums
    and products come out exactly as over the whole array in one block (float32, bit for bit)."""
    monkeypatch.setenv("MINIMAML_THREADS", "1")
    rng = np.random.default_rng(7)
    geometry = kernels.Geometry(3, 3, 2, ((1, 1), (1, 1)), (6, 6))
    x5 = rng.standard_normal((4, 3, 6, 6, 5)).astype(np.float32)
    w3 = rng.standard_normal((4, 45, 6)).astype(np.float32)
    g5 = rng.standard_normal((4, 3, 3, 3, 6)).astype(np.float32)
    x3 = (rng.standard_normal((4, 50, 6)) * 3 + 1).astype(np.float32)
    scale3, shift3 = rng.standard_normal((2, 4, 1, 6)).astype(np.float32)
    g3 = rng.standard_normal(x3.shape).astype(np.float32)

    def every_kernel():
        y3, mean, inv_std, a = kernels.batch_norm(x3, scale3, shift3, 1e-5, True)
        return (kernels.conv(x5, w3, geometry), kernels.conv_input_grad(g5, w3, geometry, 5),
                kernels.conv_filter_grad(x5, g5, geometry), y3, mean, inv_std, a,
                *kernels.batch_norm_vjp(g3, x3, y3, mean, inv_std, a))

    monkeypatch.setattr(kernels, "BLOCK_BYTES_CONV", 1 << 30)
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 1 << 30)
    assert len(kernels.blocks(4, 50, 24, kernels.BLOCK_BYTES, False).pieces) == 1
    whole = every_kernel()
    monkeypatch.setattr(kernels, "BLOCK_BYTES_CONV", 1)
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 1)
    assert kernels.blocks(4, 50, 24, kernels.BLOCK_BYTES, False).pieces[1] == (slice(1, 2), slice(None))
    for in_slabs, in_one_block in zip(every_kernel(), whole):
        np.testing.assert_array_equal(in_slabs, in_one_block)


@pytest.mark.parametrize("shape", [(1, 1024, 64), (3, 17, 5), (4, 300, 2), (1, 1, 8)])
def test_channel_sums_add_the_rows_in_order(shape):
    """``channel_sums`` (``einsum``) adds the rows one after the other as ``sum(axis=1)`` does: bit for
    bit the same as a loop of row adds onto a zero total, -0.0 entries and every scale of number
    included, and so the same bits as ``sum(axis=1)`` there."""
    rng = np.random.default_rng(11)
    block = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 4, shape)).astype(np.float32)
    block[:, :2] = -0.0
    in_order = np.zeros((shape[0], 1, shape[2]), dtype=np.float32)
    for row in range(shape[1]):
        in_order[:, 0] += block[:, row]
    total, by_reduction = np.zeros_like(in_order), np.zeros_like(in_order)
    total += kernels.channel_sums(block)
    by_reduction += block.sum(axis=1, keepdims=True)
    assert total.tobytes() == in_order.tobytes() == by_reduction.tobytes()


@pytest.mark.parametrize("a_shape, b_shape, transpose_b", [
    ((4, 10, 40), (40, 40), False),              # small: NumPy's stacked @
    ((4, 10, 1), (4, 1, 40), False),             # inner dimension 1: an outer product
    ((4, 10, 1), (1, 40), False),
    ((3, 600, 300), (300, 20), False),           # large, 2-D weight: one call
    ((3, 600, 300), (1, 300, 20), False),        # large, broadcast weight (stride 0): folded into rows
    ((3, 600, 300), (3, 300, 20), False),        # large, per-batch weights: a loop of 2-D products
    ((2, 3, 60, 30), (3, 30, 20), True),         # broadcast batch, a transposed (non-contiguous) operand
    ((50, 70), (70, 30), False),                 # plain 2-D
])
def test_matmul_matches_the_stacked_product(a_shape, b_shape, transpose_b):
    a = _rng.standard_normal(a_shape)
    b = _rng.standard_normal(b_shape)
    if transpose_b:
        b = np.ascontiguousarray(np.swapaxes(b, -1, -2)).swapaxes(-1, -2)
    fast = kernels.matmul(a, b)
    np.testing.assert_allclose(fast, kernels.reference_matmul(a, b), rtol=1e-12, atol=1e-12)
    if a.shape[-1] == 1:  # one product per entry: exactly what the GEMM computes
        np.testing.assert_array_equal(fast, kernels.reference_matmul(a, b))
    assert fast.shape == np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    out = np.empty(fast.shape)
    assert kernels.matmul(a, b, out=out) is out  # written in place, the same numbers
    np.testing.assert_array_equal(out, fast)


def test_matmul_and_conv_refuse_an_output_they_cannot_write_in_place():
    a, b = _rng.standard_normal((2, 3, 600, 300)), _rng.standard_normal((3, 300, 20))
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.matmul(a, b, out=np.empty((2, 3, 20, 600)).swapaxes(-1, -2))
    with pytest.raises(ValueError, match="not contiguous"):
        kernels._matrix_view(np.empty((2, 4, 3, 3, 5))[:, ::2])


def test_matmul_reads_operands_blas_cannot():
    """Neither of the last two axes unit-stride: the loop of 2-D products, same result."""
    base = _rng.standard_normal((2, 80, 3, 90))
    a = base[:, :, 1, :]  # (2, 80, 90), strides (.., 3 * 8 * 90 ..., 8): last axis unit stride
    b = _rng.standard_normal((2, 90, 3, 70))[:, :, 1, ::2]  # last axis stride 16: BLAS cannot read it
    assert not kernels._blas_readable(b)
    np.testing.assert_allclose(kernels.matmul(a, b), a @ b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_shape, shape", [
    ((40,), (25, 40)),                 # a new leading (task) axis
    ((25, 1, 1), (25, 10, 1)),         # stretched axes, a kept axis of length 1
    ((1, 40), (3, 25, 1, 40)),
    ((), (25,)),                       # a 0-d array
    ((3, 4), (3, 4)),                  # nothing to repeat
])
def test_broadcast_to_is_numpys_view(x_shape, shape):
    x = _rng.standard_normal(x_shape).astype(np.float32)
    for operand in [x] + ([np.asfortranarray(x)] if x.ndim > 1 else []):  # C-contiguous or not
        fast, reference = kernels.broadcast_to(operand, shape), kernels.reference_broadcast_to(operand, shape)
        assert fast.shape == reference.shape and fast.strides == reference.strides
        assert not fast.flags.writeable
        np.testing.assert_array_equal(fast, reference)


def test_broadcast_to_refuses_shapes_that_do_not_broadcast():
    with pytest.raises(ValueError):
        kernels.broadcast_to(np.zeros((3, 2)), (3, 4))
    with pytest.raises(ValueError):
        kernels.broadcast_to(np.zeros((3, 2)), (2,))
