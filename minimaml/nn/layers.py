"""Functional layers on the tape: linear, conv2d, batch_norm, max_pool2x2, flatten (a ReLU is
``autodiff.relu``, or fused into ``batch_norm(..., relu=True)``).

Each layer is a function of its input and its parameters (arrays or Tensors); nothing is stored.

Task axes. Data carries leading task axes, ``x: (*task, N, ...)``. A parameter either has the same
leading task axes (a per-task copy, e.g. adapted weights in MAML's inner loop: a filter
``(T, kh, kw, C_in, C_out)``, a scale ``(T, C)``) or none (shared by all tasks). Each layer reads how
many leading axes a parameter has from its own shape and reshapes it to line up with the data from the
left, e.g. a scale ``(*lead, C)`` becomes ``(*lead, 1, ..., 1, C)``; so per-task and shared parameters
mix freely, and all T tasks run in one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import autodiff as ad
from .. import backend
from ..autodiff import ShapeError, Tensor, nnops


def _lead(param: Tensor, core_ndim: int, x: Tensor, op: str) -> tuple:
    """The leading (task) axes of ``param``, beyond its ``core_ndim`` own axes, checked against ``x``'s."""
    lead = param.shape[:param.ndim - core_ndim]
    if param.ndim < core_ndim or x.shape[:len(lead)] != lead:
        raise ShapeError(f"{op}: parameter {param.shape} does not fit input {x.shape}: its leading task "
                         f"axes {lead} must equal the input's leading axes")
    return lead


def _align(param: Tensor, core_ndim: int, x: Tensor, op: str) -> Tensor:
    """``param: (*lead, *core)`` reshaped to ``(*lead, 1, ..., 1, *core)`` with ``x.ndim`` axes, so that it
    broadcasts against ``x: (*lead, ..., *core-sized axes)`` with the task axes lined up from the left."""
    lead = _lead(param, core_ndim, x, op)
    ones = (1,) * (x.ndim - param.ndim)
    return param if not ones else ad.reshape(param, lead + ones + param.shape[len(lead):])


def linear(x, w, b=None, relu: bool = False) -> Tensor:
    """y = x w + b, or max(x w + b, 0) with ``relu=True`` (the layer and its ReLU as one node,
    ``autodiff.affine``).

    ``x: (*task, ..., N, in)``, ``w: (*lead, in, out)``, ``b: (*lead, out)`` or None, where ``lead`` is
    ``task`` (per-task weights) or empty (shared). Returns ``(*task, ..., N, out)``.
    """
    x, w = ad.as_tensor(x), ad.as_tensor(w)
    if w.ndim < 2 or x.ndim < 2 or x.shape[-1] != w.shape[-2]:
        raise ShapeError(f"linear: input {x.shape} does not fit weight {w.shape} "
                         f"(expected input (..., N, in) and weight (*task, in, out))")
    if b is None:
        y = ad.matmul(x, _align(w, 2, x, "linear"))
        return ad.relu(y) if relu else y
    b = ad.as_tensor(b)
    if b.shape[-1:] != w.shape[-1:]:
        raise ShapeError(f"linear: bias {b.shape} does not fit weight {w.shape}")
    _lead(b, 1, x, "linear")
    return ad.affine(x, _align(w, 2, x, "linear"), b, relu=relu)


def conv2d(x, w, b=None, stride: int = 1, padding="SAME") -> Tensor:
    """2-D convolution (cross-correlation) plus an optional per-channel bias.

    out[p, o] = sum_{i, j, c} x_pad[stride p + (i, j), c] w[i, j, c, o] + b[o].
    ``x: (*task, N, H, W, C_in)``, ``w: (*lead, kh, kw, C_in, C_out)``, ``b: (*lead, C_out)`` or None.
    ``padding``: 'SAME' (TensorFlow's: output ceil(H / stride), the odd zero at the bottom/right),
    'VALID', an int (symmetric zeros) or ``((top, bottom), (left, right))``.
    Returns ``(*task, N, Ho, Wo, C_out)``.
    """
    y = ad.conv2d(x, w, stride=stride, padding=padding)
    if b is not None:
        b = ad.as_tensor(b)
        if b.shape[-1:] != y.shape[-1:]:
            raise ShapeError(f"conv2d: bias {b.shape} does not fit filters {ad.as_tensor(w).shape}")
        y = y + _align(b, 1, y, "conv2d")
    return y


@dataclass
class RunningStats:
    """Running per-channel mean and (biased) variance for evaluating batch norm without batch statistics.

    Updated outside the tape by ``batch_norm(..., running=stats, training=True)``:
    m <- (1 - momentum) m + momentum mean_batch, likewise v; statistics of a per-task batch are averaged
    over the tasks first. ``mean, var: (C,)`` arrays.
    """

    mean: object
    var: object
    momentum: float = 0.1

    def update(self, batch_mean, batch_var) -> None:
        m = self.momentum
        self.mean = (1 - m) * self.mean + m * batch_mean
        self.var = (1 - m) * self.var + m * batch_var


def batch_norm(x, scale=None, shift=None, eps: float = 1e-3, example_axes: int = 3,
               running: RunningStats | None = None, training: bool = True, relu: bool = False) -> Tensor:
    """Batch normalisation with the statistics of the current batch, per task and per channel:

        y = scale (x - mean) / sqrt(var + eps) + shift,

    mean and biased variance taken over the ``example_axes`` axes before the channel axis
    (3 for images ``(*task, N, H, W, C)``, 1 for features ``(*task, N, C)``), separately for each task;
    a support and a query forward are normalised separately. Gradients flow through mean and var.
    ``scale, shift: (*lead, C)`` (``lead``: the task axes or none) or None (no scale / no shift).
    ``eps``: 1e-3 in the paper's code (``tf.contrib.layers.batch_norm``), 1e-5 in PyTorch.

    Transductive: as in the paper's code, statistics come from the batch at test time too, so a
    query set's predictions depend on the other query examples. For the alternative pass
    ``running``: with ``training=True`` its statistics are updated (outside the tape) from the batch;
    with ``training=False`` they replace the batch statistics (as constants).

    ``relu=True`` applies a ReLU to the result, within the same fused primitive
    (``nnops.batch_normalize``): the conv and MLP blocks' batch norm -> ReLU in one pass.
    """
    x = ad.as_tensor(x)
    if x.ndim < example_axes + 1:
        raise ShapeError(f"batch_norm: input {x.shape} needs {example_axes} example axes and a channel axis")
    # One example axis instead of several: (*lead, N, H, W, C) -> (*lead, N H W, C) (a view), so every
    # per-channel reduction below, and in the reverse pass, sums over one axis (faster in NumPy).
    lead = x.shape[:x.ndim - 1 - example_axes]
    examples = 1
    for n in x.shape[len(lead):-1]:
        examples *= n
    flat = ad.reshape(x, (*lead, examples, x.shape[-1]))
    if scale is not None:
        scale = _check_channels(_align(ad.as_tensor(scale), 1, flat, "batch_norm"), x, "scale")
    if shift is not None:
        shift = _check_channels(_align(ad.as_tensor(shift), 1, flat, "batch_norm"), x, "shift")
    if training:
        y = nnops.batch_normalize(flat, scale, shift, eps, relu=relu)  # one fused primitive, see its docstring
        if running is not None:
            task_axes = tuple(range(flat.ndim - 2))  # per-task statistics, averaged over the tasks
            running.update(flat.data.mean(axis=-2).mean(axis=task_axes),
                           flat.data.var(axis=-2).mean(axis=task_axes))
    else:
        if running is None:
            raise ValueError("batch_norm: training=False needs running statistics (running=RunningStats)")
        factor = Tensor(1 / backend.array_namespace(x.data).sqrt(running.var.astype(x.dtype) + eps))
        if scale is not None:
            factor = factor * scale
        y = nnops.channel_scale(flat - Tensor(running.mean.astype(x.dtype)), factor)
        if shift is not None:
            y = y + shift
        if relu:
            y = ad.relu(y)
    return ad.reshape(y, x.shape)


def _check_channels(param: Tensor, x: Tensor, name: str) -> Tensor:
    if param.shape[-1] != x.shape[-1]:
        raise ShapeError(f"batch_norm: {name} has {param.shape[-1]} channels, input {x.shape} has {x.shape[-1]}")
    return param


def max_pool2x2(x) -> Tensor:
    """2x2 max-pooling, stride 2, 'VALID' (an odd last row/column is dropped): ``(..., H, W, C)`` ->
    ``(..., H // 2, W // 2, C)``."""
    return ad.max_pool2x2(x)


def flatten(x, keep: int) -> Tensor:
    """Merge all axes after the first ``keep`` into one, in C order: ``(*kept, H, W, C)`` ->
    ``(*kept, H W C)``. For images ``(*task, N, H, W, C)`` use ``keep = x.ndim - 3``."""
    x = ad.as_tensor(x)
    if not 0 <= keep < x.ndim:
        raise ShapeError(f"flatten: cannot keep {keep} axes of an input {x.shape}")
    return ad.reshape(x, x.shape[:keep] + (-1,))
