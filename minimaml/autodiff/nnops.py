"""Neural-network operations: convolution (im2col/col2im + matmul), 2x2 max-pooling, log-softmax, losses.

Images are channel-last, as in the paper's TensorFlow code: ``x: (..., H, W, C)``; filters are
``(kh, kw, C_in, C_out)``. Only ``im2col`` and ``col2im`` are new primitives (each the other's adjoint,
so each is the other's VJP); everything else is built from ``ops`` and inherits their derivatives.
"""

from __future__ import annotations

from .. import backend
from . import ops
from .ops import ShapeError
from .tensor import Tensor, record


def same_padding(size: int, kernel: int, stride: int) -> tuple:
    """TensorFlow's 'SAME' padding along one axis: output ceil(size / stride), extra zero at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2)


def _output_size(size: int, kernel: int, stride: int, pad: tuple) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _patch_slices(kh: int, kw: int, stride: int, ho: int, wo: int):
    """For each kernel offset (i, j): the strided window of the padded image it reads."""
    for i in range(kh):
        for j in range(kw):
            yield i, j, (Ellipsis, slice(i, i + stride * (ho - 1) + 1, stride),
                         slice(j, j + stride * (wo - 1) + 1, stride), slice(None))


def im2col(x, kh: int, kw: int, stride: int, padding: tuple) -> Tensor:
    """Patches of ``x: (..., H, W, C)`` as rows: ``(..., Ho, Wo, kh*kw*C)``, zero-padded by
    ``padding = ((top, bottom), (left, right))``. Linear; its VJP is ``col2im``."""
    x = ops.as_tensor(x)
    xp = backend.array_namespace(x.data)
    *lead, h, w, c = x.shape
    ho = _output_size(h, kh, stride, padding[0])
    wo = _output_size(w, kw, stride, padding[1])
    if ho < 1 or wo < 1:
        raise ShapeError(f"im2col: a {kh}x{kw} kernel does not fit image {x.shape} with padding {padding}")
    padded = xp.pad(x.data, [(0, 0)] * len(lead) + [padding[0], padding[1], (0, 0)])
    cols = xp.empty((*lead, ho, wo, kh, kw, c), dtype=x.dtype)
    for i, j, window in _patch_slices(kh, kw, stride, ho, wo):
        cols[..., i, j, :] = padded[window]
    cols = cols.reshape(*lead, ho, wo, kh * kw * c)
    return record(cols, (x,), lambda g: (col2im(g, x.shape, kh, kw, stride, padding),))


def col2im(cols, image_shape: tuple, kh: int, kw: int, stride: int, padding: tuple) -> Tensor:
    """The adjoint of ``im2col``: add each patch row back onto the image it was read from.
    ``cols: (..., Ho, Wo, kh*kw*C)`` -> ``(..., H, W, C)``. Linear; its VJP is ``im2col``."""
    cols = ops.as_tensor(cols)
    xp = backend.array_namespace(cols.data)
    *lead, h, w, c = image_shape
    ho, wo = cols.shape[-3], cols.shape[-2]
    (top, bottom), (left, right) = padding
    padded = xp.zeros((*lead, h + top + bottom, w + left + right, c), dtype=cols.dtype)
    patches = cols.data.reshape(*cols.shape[:-1], kh, kw, c)
    for i, j, window in _patch_slices(kh, kw, stride, ho, wo):
        padded[window] += patches[..., i, j, :]
    image = padded[..., top:top + h, left:left + w, :]
    return record(image, (cols,), lambda g: (im2col(g, kh, kw, stride, padding),))


def conv2d(x, w, stride: int = 1, padding="SAME") -> Tensor:
    """2-D cross-correlation (what deep learning calls convolution), as im2col + one matmul.

    ``x: (*task, *batch, H, W, C_in)``, ``w: (*task, kh, kw, C_in, C_out)``: the leading task axes of
    ``w`` (none, or a task axis of per-task filters) match the leading axes of ``x``; all further
    leading axes of ``x`` are images. ``padding``: 'SAME' (TensorFlow's), 'VALID', an int, or
    ``((top, bottom), (left, right))``. Returns ``(*task, *batch, Ho, Wo, C_out)``:
    out[p, o] = sum_{i, j, c} x_pad[s p + (i, j), c] w[i, j, c, o].
    """
    x, w = ops._operands("conv2d", x, w)
    if w.ndim < 4 or x.ndim < w.ndim - 1:
        raise ShapeError(f"conv2d: filters {w.shape} must be (*task, kh, kw, C_in, C_out) and images "
                         f"{x.shape} (*task, *batch, H, W, C_in)")
    task = w.shape[:-4]
    kh, kw, c_in, c_out = w.shape[-4:]
    if x.shape[-1] != c_in or x.shape[:len(task)] != task:
        raise ShapeError(f"conv2d: images {x.shape} do not fit filters {w.shape} "
                         f"(expected images (*{task}, ..., H, W, {c_in}))")
    h, wd = x.shape[-3], x.shape[-2]
    if padding == "SAME":
        pad = (same_padding(h, kh, stride), same_padding(wd, kw, stride))
    elif padding == "VALID":
        pad = ((0, 0), (0, 0))
    elif isinstance(padding, int):
        pad = ((padding, padding), (padding, padding))
    else:
        pad = tuple(tuple(p) for p in padding)
    cols = im2col(x, kh, kw, stride, pad)  # (*task, *batch, Ho, Wo, K)
    batch = x.shape[len(task):-3]
    ho, wo = cols.shape[-3], cols.shape[-2]
    rows = 1
    for n in batch:
        rows *= n
    cols = ops.reshape(cols, (*task, rows * ho * wo, kh * kw * c_in))
    out = ops.matmul(cols, ops.reshape(w, (*task, kh * kw * c_in, c_out)))
    return ops.reshape(out, (*task, *batch, ho, wo, c_out))


def max_pool2x2(x) -> Tensor:
    """2x2 max-pooling with stride 2 and 'VALID' padding (odd edges dropped) of ``x: (..., H, W, C)``:
    crop, view the image as 2x2 blocks, take each block's max (``ops.max`` gives the derivatives)."""
    x = ops.as_tensor(x)
    *lead, h, w, c = x.shape
    if h < 2 or w < 2:
        raise ShapeError(f"max_pool2x2: image {x.shape} is smaller than 2x2")
    if h % 2 or w % 2:
        x = ops.getitem(x, (Ellipsis, slice(0, h - h % 2), slice(0, w - w % 2), slice(None)))
    blocks = ops.reshape(x, (*lead, h // 2, 2, w // 2, 2, c))
    return ops.max(blocks, axis=(-4, -2))


def logsumexp(x, axis: int = -1, keepdims: bool = False) -> Tensor:
    """log sum_j e^{x_j}, computed as m + log sum_j e^{x_j - m} with m = max_j x_j held constant
    (m cancels in every derivative, so holding it constant is exact)."""
    x = ops.as_tensor(x)
    xp = backend.array_namespace(x.data)
    m = Tensor(xp.max(x.data, axis=axis, keepdims=True))
    out = ops.log(ops.sum(ops.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else ops.reshape(out, tuple(n for i, n in enumerate(out.shape)
                                                        if i != axis % x.ndim))


def log_softmax(x, axis: int = -1) -> Tensor:
    """log softmax: x_i - logsumexp(x)."""
    x = ops.as_tensor(x)
    return x - logsumexp(x, axis=axis, keepdims=True)


def mse(prediction, target) -> Tensor:
    """Mean squared error of ``prediction, target: (..., N, D)``, averaged over N and D: shape ``(...)``
    (one loss per task when there is a leading task axis)."""
    prediction, target = ops._operands("mse", prediction, target)
    if prediction.shape != target.shape:
        raise ShapeError(f"mse: prediction {prediction.shape} and target {target.shape} differ in shape")
    diff = prediction - target
    return ops.mean(diff * diff, axis=(-2, -1))


def one_hot(labels, n_classes: int, dtype):
    """Constant one-hot array ``(..., n_classes)`` of integer ``labels (...)``."""
    xp = backend.array_namespace(labels)
    return (labels[..., None] == xp.arange(n_classes)).astype(dtype)


def softmax_cross_entropy(logits, labels) -> Tensor:
    """Cross-entropy of ``logits: (..., N, C)`` against integer ``labels: (..., N)``, averaged over the
    N examples: -1/N sum_n log softmax(logits_n)[label_n], shape ``(...)``."""
    logits = ops.as_tensor(logits)
    if isinstance(labels, Tensor):
        labels = labels.data
    if labels.shape != logits.shape[:-1]:
        raise ShapeError(f"softmax_cross_entropy: labels {labels.shape} do not fit logits {logits.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"softmax_cross_entropy: labels must be integers, got {labels.dtype}")
    targets = Tensor(one_hot(labels, logits.shape[-1], logits.dtype))
    return -ops.mean(ops.sum(targets * log_softmax(logits), axis=-1), axis=-1)
