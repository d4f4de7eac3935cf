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


def _valid_range(offset: int, size: int, out: int, stride: int, before: int) -> tuple:
    """Along one axis, for kernel offset ``k``: output positions ``p`` in ``[lo, hi)`` read the input
    position ``stride p + k - before`` inside ``[0, size)`` (the others read padding zeros), and
    ``start`` is the input position of ``p = lo``. Returns ``(lo, hi, start)``."""
    lo = max(0, -(-(before - offset) // stride))
    hi = max(lo, min(out, (size - 1 + before - offset) // stride + 1))
    return lo, hi, stride * lo + offset - before


def _offset_windows(kh: int, kw: int, stride: int, image_shape: tuple, ho: int, wo: int, padding: tuple):
    """For each kernel offset (i, j): ``(i, j, out_window, in_window, borders)``, where the patch entries
    ``cols[..., out_window, i, j, :]`` are read from the unpadded image ``x[in_window]`` and the
    entries ``cols[..., border, i, j, :]`` of each border window read padding (zero).
    Working on the unpadded image saves the padded copy of ``x`` (im2col) or of the result (col2im)."""
    h, w = image_shape
    for i in range(kh):
        p_lo, p_hi, r0 = _valid_range(i, h, ho, stride, padding[0][0])
        rows_in = slice(r0, r0 + stride * (p_hi - p_lo - 1) + 1, stride) if p_hi > p_lo else slice(0, 0)
        for j in range(kw):
            q_lo, q_hi, c0 = _valid_range(j, w, wo, stride, padding[1][0])
            cols_in = slice(c0, c0 + stride * (q_hi - q_lo - 1) + 1, stride) if q_hi > q_lo else slice(0, 0)
            borders = [(slice(0, p_lo), slice(None)), (slice(p_hi, ho), slice(None)),
                       (slice(p_lo, p_hi), slice(0, q_lo)), (slice(p_lo, p_hi), slice(q_hi, wo))]
            yield (i, j, (Ellipsis, slice(p_lo, p_hi), slice(q_lo, q_hi), slice(None)),
                   (Ellipsis, rows_in, cols_in, slice(None)),
                   [(Ellipsis, *b, slice(None)) for b in borders if b[0].stop > b[0].start and
                    (b[1].stop is None or b[1].stop > b[1].start)])


_CHUNK_BYTES = 2 << 20  # im2col / col2im work on about this many bytes of patches at a time


def _image_chunks(n_images: int, patch_bytes_per_image: int, on_gpu: bool):
    """Slices of the flattened image axis, each covering about ``_CHUNK_BYTES`` of patches, so that the
    strided copies (im2col) and strided adds (col2im) of a chunk stay in the CPU cache. On the GPU
    (no such cache to fit, and a kernel launch per copy) one chunk holds every image."""
    if on_gpu:
        yield slice(0, n_images)
        return
    step = max(1, _CHUNK_BYTES // max(1, patch_bytes_per_image))
    for start in range(0, n_images, step):
        yield slice(start, min(start + step, n_images))


def im2col(x, kh: int, kw: int, stride: int, padding: tuple) -> Tensor:
    """Patches of ``x: (..., H, W, C)`` as rows: ``(..., Ho, Wo, kh*kw*C)``, zero-padded by
    ``padding = ((top, bottom), (left, right))``:

        cols[..., p, q, (i, j, c)] = x_pad[..., stride p + i, stride q + j, c].

    Linear; its VJP is ``col2im``. Each offset's strided window of ``x`` is copied straight into the
    patches (padding entries are written as zeros, no padded copy of ``x`` is made), a cache-sized
    chunk of images at a time."""
    x = ops.as_tensor(x)
    xp = backend.array_namespace(x.data)
    *lead, h, w, c = x.shape
    ho = _output_size(h, kh, stride, padding[0])
    wo = _output_size(w, kw, stride, padding[1])
    if ho < 1 or wo < 1:
        raise ShapeError(f"im2col: a {kh}x{kw} kernel does not fit image {x.shape} with padding {padding}")
    cols = xp.empty((*lead, ho, wo, kh, kw, c), dtype=x.dtype)
    images = x.data.reshape(-1, h, w, c)
    patches = cols.reshape(-1, ho, wo, kh, kw, c)
    windows = list(_offset_windows(kh, kw, stride, (h, w), ho, wo, padding))
    for chunk in _image_chunks(images.shape[0], patches[0].nbytes, backend.is_gpu_array(cols)):
        for i, j, out_window, in_window, borders in windows:
            target = patches[chunk, ..., i, j, :]
            target[out_window] = images[chunk][in_window]
            for border in borders:
                target[border] = 0
    cols = cols.reshape(*lead, ho, wo, kh * kw * c)
    return record(cols, (x,), lambda g: (col2im(g, x.shape, kh, kw, stride, padding),))


def col2im(cols, image_shape: tuple, kh: int, kw: int, stride: int, padding: tuple) -> Tensor:
    """The adjoint of ``im2col``: add each patch row back onto the image it was read from.
    ``cols: (..., Ho, Wo, kh*kw*C)`` -> ``(..., H, W, C)``:

        image[..., y, x, c] = sum over (p, q, i, j) with stride p + i - top = y, stride q + j - left = x
                              of cols[..., p, q, (i, j, c)].

    Linear; its VJP is ``im2col``. Patch entries that read padding are dropped (no padded image is
    built and cropped), and the strided adds run a cache-sized chunk of images at a time."""
    cols = ops.as_tensor(cols)
    xp = backend.array_namespace(cols.data)
    *lead, h, w, c = image_shape
    ho, wo = cols.shape[-3], cols.shape[-2]
    image = xp.zeros((*lead, h, w, c), dtype=cols.dtype)
    images = image.reshape(-1, h, w, c)
    patches = cols.data.reshape(-1, ho, wo, kh, kw, c)
    windows = list(_offset_windows(kh, kw, stride, (h, w), ho, wo, padding))
    for chunk in _image_chunks(images.shape[0], patches[0].nbytes, backend.is_gpu_array(image)):
        for i, j, out_window, in_window, _ in windows:
            images[chunk][in_window] += patches[chunk, ..., i, j, :][out_window]
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


def channel_dot(a, b) -> Tensor:
    """Per-channel dot product over the examples axis (the second-last):
    ``a, b: (..., P, C)`` -> ``(..., 1, C)``, out[..., 0, c] = sum_p a[..., p, c] b[..., p, c].

    One fused pass (``einsum``), where ``sum(a * b)`` would write the product out first. The
    batch-norm statistics and the gradients of its per-channel factors are such sums. ``b`` may be
    ``a`` itself (a sum of squares). VJP: (g b, g a), g broadcast over P (for ``a * a``: 2 g a, one
    product); each a single pass, as ``g`` is per channel.
    """
    a, b = ops._operands("channel_dot", a, b)
    if a.shape != b.shape or a.ndim < 2:
        raise ShapeError(f"channel_dot: operands {a.shape} and {b.shape} must share one shape (..., P, C)")
    xp = backend.array_namespace(a.data)
    out = xp.einsum("...pc,...pc->...c", a.data, b.data)[..., None, :]
    if a is b:
        return record(out, (a,), lambda g: (ops.multiply(a, ops.multiply(g, 2.0)),))

    def vjp(g):
        return (ops.multiply(g, b) if a.requires_grad else None,
                ops.multiply(g, a) if b.requires_grad else None)

    return record(out, (a, b), vjp)


def channel_scale(x, s) -> Tensor:
    """``x * s`` for ``x: (..., P, C)`` and a per-channel ``s`` that broadcasts to ``x`` without
    stretching the examples axis P (``(..., 1, C)``, ``(1, C)`` or ``(C,)``).

    The same product as ``ops.multiply``; only its VJP differs: s's cotangent
    sum_p g[..., p, c] x[..., p, c] is one fused ``channel_dot`` instead of a product written out and
    then summed. VJP: (channel_scale(g, s), channel_dot(g, x) summed to s's shape).
    """
    x, s = ops._operands("channel_scale", x, s)
    if s.ndim >= 2 and s.shape[-2] != 1 or s.ndim > x.ndim or x.ndim < 2:
        raise ShapeError(f"channel_scale: scale {s.shape} must be per channel for input {x.shape} (..., P, C)")
    try:
        out = x.data * s.data
    except ValueError as err:
        raise ShapeError(f"channel_scale: cannot broadcast scale {s.shape} to input {x.shape}") from err

    def vjp(g):
        return (channel_scale(g, s) if x.requires_grad else None,
                ops._unbroadcast(channel_dot(g, x), s.shape) if s.requires_grad else None)

    return record(out, (x, s), vjp)


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
