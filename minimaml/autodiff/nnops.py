"""Neural-network operations: convolution, batch norm, 2x2 max-pooling, log-softmax, losses.

Images are channel-last, as in the paper's TensorFlow code: ``x: (..., H, W, C)``; filters are
``(kh, kw, C_in, C_out)``. The primitives here: ``im2col`` and ``col2im`` (each the other's adjoint,
so each is the other's VJP); the convolution with its input and filter gradients (closed under VJPs);
``channel_dot``, ``channel_scale``, ``batch_normalize`` and ``mean_square`` (MSE's mean of squares).
Everything else is built from ``ops`` and inherits their derivatives. The rules here are the math; how
the convolution, im2col / col2im and batch norm run on the arrays (in cache-sized blocks shared out over
the CPU cores) is in ``kernels``.
"""

from __future__ import annotations

from .. import backend
from . import kernels, ops
from .ops import ShapeError
from .tensor import Tensor, is_recording, record


def same_padding(size: int, kernel: int, stride: int) -> tuple:
    """TensorFlow's 'SAME' padding along one axis: output ceil(size / stride), extra zero at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2)


def im2col(x, kh: int, kw: int, stride: int, padding: tuple) -> Tensor:
    """Patches of ``x: (..., H, W, C)`` as rows: ``(..., Ho, Wo, kh*kw*C)``, zero-padded by
    ``padding = ((top, bottom), (left, right))``:

        cols[..., p, q, (i, j, c)] = x_pad[..., stride p + i, stride q + j, c].

    Linear; its VJP is ``col2im``. Each offset's strided window of ``x`` is copied straight into the
    patches (padding entries are written as zeros, no padded copy of ``x`` is made), a cache-sized
    block of images at a time."""
    x = ops.as_tensor(x)
    *lead, h, w, c = x.shape
    geometry = kernels.Geometry(kh, kw, stride, padding, (h, w))
    if geometry.ho < 1 or geometry.wo < 1:
        raise ShapeError(f"im2col: a {kh}x{kw} kernel does not fit image {x.shape} with padding {padding}")
    cols = kernels.im2col(x.data, geometry)
    return record(cols, (x,), lambda g: (col2im(g, x.shape, kh, kw, stride, padding),))


def col2im(cols, image_shape: tuple, kh: int, kw: int, stride: int, padding: tuple) -> Tensor:
    """The adjoint of ``im2col``: add each patch row back onto the image it was read from.
    ``cols: (..., Ho, Wo, kh*kw*C)`` -> ``(..., H, W, C)``:

        image[..., y, x, c] = sum over (p, q, i, j) with stride p + i - top = y, stride q + j - left = x
                              of cols[..., p, q, (i, j, c)].

    Linear; its VJP is ``im2col``. Patch entries that read padding are dropped (no padded image is
    built and cropped), and the strided adds run a cache-sized block of images at a time."""
    cols = ops.as_tensor(cols)
    *lead, h, w, c = image_shape
    image = kernels.col2im(cols.data, image_shape, kernels.Geometry(kh, kw, stride, padding, (h, w)))
    return record(image, (cols,), lambda g: (im2col(g, kh, kw, stride, padding),))


def conv2d(x, w, stride: int = 1, padding="SAME") -> Tensor:
    """2-D cross-correlation (what deep learning calls convolution), as im2col + matmul.

    ``x: (*task, *batch, H, W, C_in)``, ``w: (*task, kh, kw, C_in, C_out)``: the leading task axes of
    ``w`` (none, or a task axis of per-task filters) match the leading axes of ``x``; all further
    leading axes of ``x`` are images. ``padding``: 'SAME' (TensorFlow's), 'VALID', an int, or
    ``((top, bottom), (left, right))``. Returns ``(*task, *batch, Ho, Wo, C_out)``:
    out[p, o] = sum_{i, j, c} x_pad[s p + (i, j), c] w[i, j, c, o].

    The patch matrix is never built whole: each cache-sized block of images is unfolded and multiplied
    at once (``kernels.conv``), the blocks shared out over the CPU threads. So the convolution is a
    primitive, and so are its two derivatives,

        input gradient   dx = col2im(g w^T)       ``_conv_input_grad``
        filter gradient  dw = im2col(x)^T g       ``_conv_filter_grad``

    each likewise blockwise. The three are closed under VJPs (each is bilinear), which keeps every
    order of derivative on these blockwise passes:

        conv(x, w)          VJP g -> (input_grad(g, w),  filter_grad(x, g))
        input_grad(g, w)    VJP h -> (conv(h, w),        filter_grad(h, g))
        filter_grad(x, g)   VJP h -> (input_grad(g, h),  conv(x, h))
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
    geometry = kernels.Geometry(kh, kw, stride, pad, (h, wd))
    if geometry.ho < 1 or geometry.wo < 1:
        raise ShapeError(f"conv2d: a {kh}x{kw} kernel does not fit images {x.shape} with padding {pad}")
    return _conv(x, w, geometry)


def _task_view(a, n_task_axes: int):
    """Images ``a: (*task, *batch, H, W, C)`` as ``(L, n, H, W, C)``: L = the product of the task axes,
    n of the batch axes."""
    n_tasks = 1
    for size in a.shape[:n_task_axes]:
        n_tasks *= size
    return a.reshape(n_tasks, -1, *a.shape[-3:])


def _filter_matrices(w):
    """Filters ``(*task, kh, kw, C_in, C_out)`` as matrices ``(L, kh kw C_in, C_out)``."""
    return w.reshape(-1, w.shape[-4] * w.shape[-3] * w.shape[-2], w.shape[-1])


def _conv(x: Tensor, w: Tensor, geometry: kernels.Geometry) -> Tensor:
    """The convolution primitive (see ``conv2d``): ``x: (*task, *batch, H, W, C_in)``, ``w: (*task, kh, kw,
    C_in, C_out)`` -> ``(*task, *batch, Ho, Wo, C_out)``."""
    n_task = w.ndim - 4
    w3 = _filter_matrices(w.data)
    out = kernels.conv(_task_view(x.data, n_task), w3, geometry)
    out = out.reshape(*x.shape[:-3], geometry.ho, geometry.wo, w.shape[-1])

    def vjp(g):
        return (_conv_input_grad(g, w, geometry, x.shape) if x.requires_grad else None,
                _conv_filter_grad(x, g, geometry, w.shape) if w.requires_grad else None)

    return record(out, (x, w), vjp)


def _conv_input_grad(g, w: Tensor, geometry: kernels.Geometry, x_shape: tuple) -> Tensor:
    """The input gradient of ``_conv``, itself a primitive: g ``(*task, *batch, Ho, Wo, C_out)`` -> dx."""
    g = ops.as_tensor(g)
    n_task = w.ndim - 4
    w3 = _filter_matrices(w.data)
    dx = kernels.conv_input_grad(_task_view(g.data, n_task), w3, geometry, w.shape[-2]).reshape(x_shape)

    def vjp(h):
        return (_conv(h, w, geometry) if g.requires_grad else None,
                _conv_filter_grad(h, g, geometry, w.shape) if w.requires_grad else None)

    return record(dx, (g, w), vjp)


def _conv_filter_grad(x: Tensor, g, geometry: kernels.Geometry, w_shape: tuple) -> Tensor:
    """The filter gradient of ``_conv``, itself a primitive: (x, g) -> dw of shape ``w_shape``."""
    g = ops.as_tensor(g)
    n_task = len(w_shape) - 4
    dw = kernels.conv_filter_grad(_task_view(x.data, n_task), _task_view(g.data, n_task), geometry)
    dw = dw.reshape(w_shape)

    def vjp(h):
        return (_conv_input_grad(g, h, geometry, x.shape) if x.requires_grad else None,
                _conv(x, h, geometry) if g.requires_grad else None)

    return record(dw, (x, g), vjp)


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


def _per_channel(name: str, p, x: Tensor):
    """``p``, a per-channel parameter of ``batch_normalize``, as a Tensor checked against
    ``x: (..., P, C)``: ``(C,)`` or ``(..., 1, C)`` with leading axes that broadcast to x's."""
    if p is None:
        return None
    p = ops.as_tensor(p)
    if p.dtype != x.dtype:
        raise TypeError(f"batch_normalize: {name} is {p.dtype}, the input is {x.dtype}")
    lead = p.shape[:-2]
    if (p.ndim == 0 or p.ndim > x.ndim or p.shape[-1] != x.shape[-1] or p.ndim >= 2 and p.shape[-2] != 1
            or any(n not in (1, m) for n, m in zip(reversed(lead), reversed(x.shape[:-2])))):
        raise ShapeError(f"batch_normalize: {name} {p.shape} must be per channel, (..., 1, {x.shape[-1]}) "
                         f"broadcasting to the input {x.shape}")
    return p


def batch_normalize(x, scale=None, shift=None, eps: float = 1e-3, relu: bool = False) -> Tensor:
    """Batch normalisation with the batch's own statistics, per channel and per leading index,
    optionally followed by a ReLU:

        y = scale (x - mean) / sqrt(var + eps) + shift        (relu: y = max(that, 0)),

    for ``x: (..., P, C)`` with the mean and the biased variance taken over the P examples; ``scale``
    and ``shift``: per channel, ``(..., 1, C)`` or ``(C,)``, or None.

    One primitive rather than a chain of ``ops`` (which wrote seven intermediate arrays the size of x):
    the forward pass reads x three times (mean; variance; y = a x + b with per-channel
    a = scale / sqrt(var + eps) and b = shift - a mean, then the ReLU) and writes y once, a
    cache-sized block at a time, the blocks shared out over the CPU threads. VJP, with
    x_hat = (x - mean) / sqrt(var + eps) and g' = g [y > 0] after a ReLU (else g' = g):

        d shift = sum_p g',    d scale = sum_p g' x_hat,    dx = a (g' - d shift / P - x_hat d scale / P).

    When the reverse pass is being recorded (``grad(..., create_graph=True)``) that VJP is written with
    tape operations, so that it can be differentiated again (``_batch_normalize_vjp_taped``); otherwise
    it runs on the raw arrays in blocks (``kernels.batch_norm_vjp``), the same formula.
    """
    x = ops.as_tensor(x)
    if x.ndim < 2:
        raise ShapeError(f"batch_normalize: input {x.shape} needs an examples axis and a channel axis "
                         "(..., P, C)")
    scale, shift = _per_channel("scale", scale, x), _per_channel("shift", shift, x)
    xp = backend.array_namespace(x.data)
    stats_shape = (*x.shape[:-2], 1, x.shape[-1])
    x3 = x.data.reshape(-1, *x.shape[-2:])
    per_task = (x3.shape[0], 1, x.shape[-1])
    scale3, shift3 = (None if p is None else xp.broadcast_to(p.data, stats_shape).reshape(per_task)
                      for p in (scale, shift))
    y3, mean, inv_std, a = kernels.batch_norm(x3, scale3, shift3, eps, relu)

    def vjp(g):
        if is_recording():
            if relu:
                g = ops.multiply(g, Tensor((y3 > 0).astype(y3.dtype).reshape(x.shape)))
            dx, dscale, dshift = _batch_normalize_vjp_taped(g, x, scale, eps)
        else:
            dx, dscale, dshift = kernels.batch_norm_vjp(g.data.reshape(x3.shape), x3, y3 if relu else None,
                                                        mean, inv_std, a)
            dx = Tensor(dx.reshape(x.shape))
            dscale, dshift = Tensor(dscale.reshape(stats_shape)), Tensor(dshift.reshape(stats_shape))
        cotangents = [dx if x.requires_grad else None]
        for p, d in ((scale, dscale), (shift, dshift)):
            if p is not None:
                cotangents.append(ops._unbroadcast(d, p.shape) if p.requires_grad else None)
        return tuple(cotangents)

    parents = tuple(p for p in (x, scale, shift) if p is not None)
    return record(y3.reshape(x.shape), parents, vjp)


def _batch_normalize_vjp_taped(g, x, scale, eps: float) -> tuple:
    """``batch_normalize``'s VJP ``(dx, d scale, d shift)`` (per channel, before any sum over broadcast
    axes) written with tape operations, recomputing the statistics from x, so that it is differentiable
    in g, x and scale."""
    n_rows = x.shape[-2]
    mean = ops.mean(x, axis=-2, keepdims=True)
    centred = x + ops.negative(mean)
    inv_std = 1.0 / ops.sqrt(channel_dot(centred, centred) * (1.0 / n_rows) + eps)
    x_hat = channel_scale(centred, inv_std)
    g_sum = ops.sum(g, axis=-2, keepdims=True)
    dscale = channel_dot(g, x_hat)
    a = inv_std if scale is None else inv_std * scale
    centred_g = g + ops.negative(g_sum * (1.0 / n_rows)) - channel_scale(x_hat, dscale * (1.0 / n_rows))
    return channel_scale(centred_g, a), dscale, g_sum


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
    if prediction.ndim < 2:
        raise ShapeError(f"mse: expected prediction and target (..., N, D), got shape {prediction.shape}")
    return mean_square(prediction - target)


def mean_square(d) -> Tensor:
    """mean(d * d) over the last two axes of ``d: (..., N, D)``, shape ``(...)``: MSE's mean of squared
    differences as one primitive instead of three recorded nodes (a product, a sum, a scaling), with the
    same arithmetic in the same order:

        forward  sum_{n, j} d_nj d_nj  times  1 / (N D);
        VJP      h d + h d  with  h = g / (N D)  repeated over (N, D): the product rule's two terms,
                 as the reverse pass sums them when d * d is recorded.
    """
    d = ops.as_tensor(d)
    if d.ndim < 2:
        raise ShapeError(f"mean_square: expected (..., N, D) with at least 2 axes, got shape {d.shape}")
    inverse_count = ops.as_tensor(1.0 / (d.shape[-2] * d.shape[-1]), like=d)
    out = (d.data * d.data).sum(axis=(d.ndim - 2, d.ndim - 1)) * inverse_count.data

    def vjp(g):
        h = ops.multiply(g, inverse_count)
        h = ops.broadcast_to(ops.reshape(h, h.shape + (1, 1)), d.shape)
        return (ops.multiply(h, d) + ops.multiply(h, d),)

    return record(out, (d,), vjp)


def one_hot(labels, n_classes: int, dtype):
    """Constant one-hot array ``(..., n_classes)`` of integer ``labels (...)``."""
    xp = backend.array_namespace(labels)
    return (labels[..., None] == xp.arange(n_classes)).astype(dtype)


def _check_labels(labels, logits: Tensor) -> None:
    """Refuse labels that are not integer class indices ``(..., N)`` in ``[0, C)`` for ``logits (..., N, C)``
    (one-hot or float labels, or labels out of range, which would add zero loss silently). The range
    check is one pass over the labels and one host sync on a GPU."""
    expected, n_classes = logits.shape[:-1], logits.shape[-1]
    is_integer = labels.dtype.kind in "iu"
    if tuple(labels.shape) != tuple(expected):
        kind = "" if is_integer else f" {labels.dtype}"
        hint = " (one-hot labels? pass their argmax over the last axis)" if labels.shape == logits.shape else ""
        raise ShapeError(f"softmax_cross_entropy: expected integer class labels of shape {expected} for logits "
                         f"{logits.shape}, got{kind} labels of shape {labels.shape}{hint}")
    if not is_integer:
        raise TypeError(f"softmax_cross_entropy: expected integer class labels of shape {expected}, got "
                        f"{labels.dtype} labels")
    outside = (labels < 0) | (labels >= n_classes)
    if labels.size and bool(outside.any()):
        xp = backend.array_namespace(labels)
        bad = backend.to_numpy(xp.unique(labels[outside])).tolist()
        shown = bad if len(bad) <= 10 else bad[:10] + ["..."]
        raise ValueError(f"softmax_cross_entropy: labels {shown} are outside the valid range [0, {n_classes}) "
                         f"of {n_classes} classes (logits {logits.shape})")


def softmax_cross_entropy(logits, labels) -> Tensor:
    """Cross-entropy of ``logits: (..., N, C)`` against integer ``labels: (..., N)`` in ``[0, C)``, averaged
    over the N examples: -1/N sum_n log softmax(logits_n)[label_n], shape ``(...)``."""
    logits = ops.as_tensor(logits)
    if isinstance(labels, Tensor):
        labels = labels.data
    _check_labels(labels, logits)
    targets = Tensor(one_hot(labels, logits.shape[-1], logits.dtype))
    return -ops.mean(ops.sum(targets * log_softmax(logits), axis=-1), axis=-1)
