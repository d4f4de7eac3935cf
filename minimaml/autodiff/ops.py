"""Elementwise, reduction and shape operations, each with its vector-Jacobian product (VJP) right below.

A VJP maps the cotangent ``g`` of the output (same shape as the output) to one cotangent per input.
Every VJP is written with the operations of this module, never on raw arrays, so it is itself recorded
when the reverse pass runs with ``create_graph=True``: every rule here is differentiable to any order.
Constant masks (``x.data > 0``) are the one thing taken from raw arrays: they are piecewise constant, so
their derivative is zero almost everywhere and they carry no gradient.

A parent that needs no gradient gets ``None`` (the ``_need`` test), so the reverse pass skips the work.
"""

from __future__ import annotations

import numbers

from .. import backend
from . import kernels
from .tensor import Tensor, record


class ShapeError(ValueError):
    """Operands whose shapes do not fit the operation; the message names the operation and the shapes."""


# --- making operands ------------------------------------------------------------------------------


def as_tensor(x, like: Tensor | None = None) -> Tensor:
    """``x`` as a Tensor: Tensors pass through; arrays become constants; a Python number becomes a
    0-d constant of ``like``'s dtype and device (so ``x * 2.0`` keeps float32 float32)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, numbers.Number) and like is not None:
        return Tensor(like.dtype.type(x))  # a NumPy scalar of like's dtype (works beside CuPy too)
    return Tensor(x)


def _operands(op: str, a, b) -> tuple:
    """Both operands as Tensors on one device and of one dtype, or a clear error."""
    if not isinstance(a, Tensor):
        b = as_tensor(b)
        a = as_tensor(a, like=b)
    elif not isinstance(b, Tensor):
        b = as_tensor(b, like=a)
    if backend.gpu_in_use() and not backend.same_device(a.data, b.data):
        raise TypeError(
            f"{op}: operands live on different devices (a NumPy and a CuPy array, shapes {a.shape} and "
            f"{b.shape}); move both to one device with minimaml.backend.asarray or to_numpy"
        )
    if a.data.dtype != b.data.dtype:
        raise TypeError(
            f"{op}: operands have different dtypes {a.dtype} and {b.dtype} (shapes {a.shape} and "
            f"{b.shape}); minimaml never upcasts silently, so cast one explicitly"
        )
    return a, b


def _need(x: Tensor) -> bool:
    return x.requires_grad


def _unbroadcast(g: Tensor, shape: tuple) -> Tensor:
    """Sum ``g`` over the axes that broadcasting added or stretched, so it gets ``shape`` back."""
    if g.data.shape == shape:
        return g
    lead = g.ndim - len(shape)
    stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    if not stretched:
        return sum(g, axis=tuple(range(lead)))
    if not lead:
        return sum(g, axis=stretched, keepdims=True)
    return reshape(sum(g, axis=tuple(range(lead)) + stretched), shape)


def _broadcast_error(op: str, a: Tensor, b: Tensor) -> ShapeError:
    return ShapeError(f"{op}: cannot broadcast shapes {a.shape} and {b.shape}")


# --- arithmetic -----------------------------------------------------------------------------------


def add(a, b) -> Tensor:
    """a + b, broadcasting. VJP: (g, g), each summed back to its operand's shape."""
    a, b = _operands("add", a, b)
    try:
        out = a.data + b.data
    except ValueError as err:
        raise _broadcast_error("add", a, b) from err

    def vjp(g):
        return (_unbroadcast(g, a.shape) if _need(a) else None,
                _unbroadcast(g, b.shape) if _need(b) else None)

    return record(out, (a, b), vjp)


def subtract(a, b) -> Tensor:
    """a - b. VJP: (g, -g)."""
    a, b = _operands("subtract", a, b)
    try:
        out = a.data - b.data
    except ValueError as err:
        raise _broadcast_error("subtract", a, b) from err

    def vjp(g):
        return (_unbroadcast(g, a.shape) if _need(a) else None,
                _unbroadcast(negative(g), b.shape) if _need(b) else None)

    return record(out, (a, b), vjp)


def multiply(a, b) -> Tensor:
    """a * b. VJP: (g * b, g * a)."""
    a, b = _operands("multiply", a, b)
    try:
        out = a.data * b.data
    except ValueError as err:
        raise _broadcast_error("multiply", a, b) from err

    def vjp(g):
        return (_unbroadcast(multiply(g, b), a.shape) if _need(a) else None,
                _unbroadcast(multiply(g, a), b.shape) if _need(b) else None)

    return record(out, (a, b), vjp)


def gradient_step(theta, g, lr) -> Tensor:
    """theta - lr * g, a step of gradient descent, as one node instead of a product and a difference, with
    the same arithmetic. ``lr``: a number, or a Tensor that broadcasts against ``g`` (Meta-SGD's learned
    step sizes). VJP: (h, -h lr, -h g) for (theta, lr, g), each summed back to its shape: the product's
    VJP applied to the difference's -h, as the two separate nodes would record it.
    """
    lr, g = _operands("gradient_step", lr, g)
    theta, g = _operands("gradient_step", theta, g)
    try:
        step = lr.data * g.data
        out = theta.data - step
    except ValueError as err:
        raise ShapeError(f"gradient_step: theta {theta.shape}, lr {lr.shape} and g {g.shape} do not "
                         f"broadcast") from err
    step_shape = step.shape  # lr * g's, where the product's cotangent is summed back to

    def vjp(h):
        minus_h = _unbroadcast(negative(h), step_shape) if _need(lr) or _need(g) else None
        return (_unbroadcast(h, theta.shape) if _need(theta) else None,
                _unbroadcast(multiply(minus_h, g), lr.shape) if _need(lr) else None,
                _unbroadcast(multiply(minus_h, lr), g.shape) if _need(g) else None)

    return record(out, (theta, lr, g), vjp)


def divide(a, b) -> Tensor:
    """a / b. VJP: (g / b, -g * a / b^2)."""
    a, b = _operands("divide", a, b)
    try:
        out = a.data / b.data
    except ValueError as err:
        raise _broadcast_error("divide", a, b) from err

    def vjp(g):
        return (_unbroadcast(divide(g, b), a.shape) if _need(a) else None,
                _unbroadcast(negative(divide(multiply(g, a), multiply(b, b))), b.shape)
                if _need(b) else None)

    return record(out, (a, b), vjp)


def negative(x) -> Tensor:
    """-x. VJP: -g."""
    x = as_tensor(x)
    return record(-x.data, (x,), lambda g: (negative(g),))


def power(x, exponent) -> Tensor:
    """x ** p for a constant number p. VJP: g * p * x^(p-1). (For a Tensor exponent use exp(p log x).)"""
    x = as_tensor(x)
    if isinstance(exponent, Tensor):
        x, exponent = _operands("power", x, exponent)
        return exp(multiply(exponent, log(x)))
    if not isinstance(exponent, numbers.Number):
        raise TypeError(f"power: exponent must be a number or a Tensor, got {type(exponent).__name__}")
    p = exponent.item() if hasattr(exponent, "item") else exponent  # a NumPy scalar would upcast

    def vjp(g):
        if p == 0:
            return (None,)
        if p == 1:  # stop here: x ** 0 and x ** -1 would make 0 * inf = nan at x = 0
            return (g,)
        return (multiply(g, multiply(power(x, p - 1), p)),)

    return record(x.data ** p, (x,), vjp)


# --- elementwise functions ------------------------------------------------------------------------


def exp(x) -> Tensor:
    """e^x. VJP: g * e^x."""
    x = as_tensor(x)
    xp = backend.array_namespace(x.data)
    return record(xp.exp(x.data), (x,), lambda g: (multiply(g, exp(x)),))


def log(x) -> Tensor:
    """Natural logarithm. VJP: g / x."""
    x = as_tensor(x)
    xp = backend.array_namespace(x.data)
    return record(xp.log(x.data), (x,), lambda g: (divide(g, x),))


def sqrt(x) -> Tensor:
    """Square root. VJP: g / (2 sqrt(x))."""
    x = as_tensor(x)
    xp = backend.array_namespace(x.data)
    return record(xp.sqrt(x.data), (x,), lambda g: (divide(g, multiply(sqrt(x), 2.0)),))


def tanh(x) -> Tensor:
    """Hyperbolic tangent. VJP: g * (1 - tanh(x)^2)."""
    x = as_tensor(x)
    xp = backend.array_namespace(x.data)

    def vjp(g):
        t = tanh(x)
        return (subtract(g, multiply(g, multiply(t, t))),)

    return record(xp.tanh(x.data), (x,), vjp)


def sigmoid(x) -> Tensor:
    """1 / (1 + e^-x), computed stably. VJP: g * s (1 - s)."""
    x = as_tensor(x)
    xp = backend.array_namespace(x.data)
    e = xp.exp(-xp.abs(x.data))
    out = xp.where(x.data >= 0, 1 / (1 + e), e / (1 + e))

    def vjp(g):
        s = sigmoid(x)
        return (multiply(g, subtract(s, multiply(s, s))),)

    return record(out, (x,), vjp)


def where(mask, a, b) -> Tensor:
    """``a`` where the constant boolean ``mask`` holds, else ``b``. VJP: (g masked, g masked out)."""
    if isinstance(mask, Tensor):
        mask = mask.data
    a, b = _operands("where", a, b)
    xp = backend.array_namespace(a.data)
    try:
        out = xp.where(mask, a.data, b.data)
    except ValueError as err:
        raise ShapeError(f"where: cannot broadcast mask {mask.shape} with {a.shape} and {b.shape}") from err
    zero = xp.zeros((), dtype=a.dtype)

    def vjp(g):
        return (_unbroadcast(where(mask, g, zero), a.shape) if _need(a) else None,
                _unbroadcast(where(mask, zero, g), b.shape) if _need(b) else None)

    return record(out, (a, b), vjp)


def relu(x) -> Tensor:
    """max(x, 0) = x * [x > 0]; the mask is a constant, so its derivatives come from ``multiply``."""
    x = as_tensor(x)
    return multiply(x, Tensor((x.data > 0).astype(x.dtype)))


def maximum(a, b) -> Tensor:
    """Elementwise max(a, b) = where(a >= b, a, b) (ties go to ``a``)."""
    a, b = _operands("maximum", a, b)
    try:
        a_wins = a.data >= b.data
    except ValueError as err:
        raise _broadcast_error("maximum", a, b) from err
    return where(a_wins, a, b)


def abs(x) -> Tensor:  # noqa: A001 - the array-API name
    """|x| = x * sign(x), sign a constant."""
    x = as_tensor(x)
    return multiply(x, Tensor(backend.array_namespace(x.data).sign(x.data)))


# --- reductions -----------------------------------------------------------------------------------


def _axes(axis, ndim: int) -> tuple:
    """``axis`` (None, an int or a tuple) as a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        if not -ndim <= axis < ndim:
            raise ShapeError(f"axis {axis} is out of range for an array of {ndim} dimensions")
        return (axis % ndim,)
    out = []
    for a in axis:
        if not -ndim <= a < ndim:
            raise ShapeError(f"axis {a} is out of range for an array of {ndim} dimensions")
        out.append(a % ndim)
    return tuple(sorted(out))


def _keepdims_shape(shape: tuple, axes: tuple) -> tuple:
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def sum(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    """Sum over ``axis``. VJP: g broadcast back over the summed axes."""
    x = as_tensor(x)
    axes = _axes(axis, x.ndim)
    out = x.data.sum(axis=axes, keepdims=keepdims)

    def vjp(g):
        if not keepdims and axes != tuple(range(len(axes))):  # leading axes broadcast back by themselves
            g = reshape(g, _keepdims_shape(x.shape, axes))
        return (broadcast_to(g, x.shape),)

    return record(out, (x,), vjp)


def mean(x, axis=None, keepdims: bool = False) -> Tensor:
    """Mean over ``axis`` = sum / count."""
    x = as_tensor(x)
    axes = _axes(axis, x.ndim)
    count = 1
    for a in axes:
        count *= x.shape[a]
    return multiply(sum(x, axes, keepdims), 1.0 / count)


def max(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    """Maximum over ``axis``. VJP: g shared equally by the entries that attain the maximum."""
    x = as_tensor(x)
    axes = _axes(axis, x.ndim)
    out_kept = x.data.max(axis=axes, keepdims=True)

    def vjp(g):
        is_max = (x.data == out_kept).astype(x.dtype)
        share = is_max / is_max.sum(axis=axes, keepdims=True)
        if not keepdims:
            g = reshape(g, out_kept.shape)
        return (multiply(broadcast_to(g, x.shape), Tensor(share)),)

    out = out_kept if keepdims else out_kept.reshape(tuple(n for i, n in enumerate(x.shape) if i not in axes))
    return record(out, (x,), vjp)


# --- shape operations -----------------------------------------------------------------------------


def broadcast_to(x, shape: tuple) -> Tensor:
    """``x`` repeated along broadcast axes to ``shape``. VJP: sum back (``_unbroadcast``)."""
    x = as_tensor(x)
    shape = tuple(shape)
    try:
        out = kernels.broadcast_to(x.data, shape)
    except ValueError as err:
        raise ShapeError(f"broadcast_to: cannot broadcast shape {x.shape} to {shape}") from err
    return record(out, (x,), lambda g: (_unbroadcast(g, x.shape),))


def reshape(x, shape) -> Tensor:
    """The same entries in a new shape. VJP: reshape g back."""
    x = as_tensor(x)
    try:
        out = x.data.reshape(shape)
    except ValueError as err:
        raise ShapeError(f"reshape: cannot reshape {x.shape} ({x.size} entries) to {shape}") from err
    return record(out, (x,), lambda g: (reshape(g, x.shape),))


def transpose(x, axes=None) -> Tensor:
    """Permute axes (reverse them when ``axes`` is None). VJP: the inverse permutation."""
    x = as_tensor(x)
    ndim = x.ndim
    axes = tuple(range(ndim - 1, -1, -1)) if axes is None else tuple(a % ndim for a in axes)
    if len(axes) != ndim or len(set(axes)) != ndim:
        raise ShapeError(f"transpose: {axes} is not a permutation of the {ndim} axes of {x.shape}")
    inverse = [0] * ndim  # the permutation that undoes ``axes``
    for position, axis in enumerate(axes):
        inverse[axis] = position
    return record(x.data.transpose(axes), (x,), lambda g: (transpose(g, inverse),))


def swapaxes(x, axis1: int, axis2: int) -> Tensor:
    """Exchange two axes (a transpose that is its own inverse). VJP: swap them back."""
    x = as_tensor(x)
    if not (-x.ndim <= axis1 < x.ndim and -x.ndim <= axis2 < x.ndim):
        raise ShapeError(f"swapaxes: axes {axis1} and {axis2} are out of range for shape {x.shape}")
    return record(x.data.swapaxes(axis1, axis2), (x,), lambda g: (swapaxes(g, axis1, axis2),))


def _is_basic_index(index) -> bool:
    """True for indices made of ints, slices, None and Ellipsis (no repeated entries possible)."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, slice)) or p is None or p is Ellipsis for p in parts)


def _check_index(index):
    parts = index if isinstance(index, tuple) else (index,)
    if any(isinstance(p, Tensor) for p in parts):
        raise TypeError("getitem: index with arrays or ints, not Tensors (an index carries no gradient)")


def getitem(x, index) -> Tensor:
    """``x[index]`` (slices, ints, integer or boolean arrays). VJP: scatter g back (``scatter_add``)."""
    x = as_tensor(x)
    _check_index(index)
    try:
        out = x.data[index]
    except IndexError as err:
        raise ShapeError(f"getitem: index {index!r} does not fit shape {x.shape}") from err
    return record(out, (x,), lambda g: (scatter_add(g, index, x.shape),))


def scatter_add(values, index, shape: tuple) -> Tensor:
    """The adjoint of ``getitem``: zeros of ``shape`` with ``values`` added at ``index`` (repeated
    entries summed). Linear, so its VJP is ``getitem`` of g."""
    values = as_tensor(values)
    xp = backend.array_namespace(values.data)
    out = xp.zeros(shape, dtype=values.dtype)
    if _is_basic_index(index):
        out[index] += values.data
    else:
        backend.scatter_add(out, index, values.data)
    return record(out, (values,), lambda g: (getitem(g, index),))


def concatenate(tensors, axis: int = 0) -> Tensor:
    """Join tensors along ``axis``. VJP: each input's slice of g."""
    tensors = [as_tensor(t) for t in tensors]
    if not tensors:
        raise ShapeError("concatenate: needs at least one tensor")
    first = tensors[0]
    for t in tensors[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"concatenate: dtypes {first.dtype} and {t.dtype} differ")
        if backend.is_gpu_array(t.data) != backend.is_gpu_array(first.data):
            raise TypeError("concatenate: tensors live on different devices (NumPy and CuPy arrays)")
    xp = backend.array_namespace(first.data)
    try:
        out = xp.concatenate([t.data for t in tensors], axis=axis)
    except ValueError as err:
        shapes = [t.shape for t in tensors]
        raise ShapeError(f"concatenate: shapes {shapes} do not fit along axis {axis}") from err
    axis = axis % out.ndim
    bounds = [0]
    for t in tensors:
        bounds.append(bounds[-1] + t.shape[axis])

    def vjp(g):
        lead = (slice(None),) * axis
        return tuple(getitem(g, lead + (slice(lo, hi),)) if _need(t) else None
                     for t, lo, hi in zip(tensors, bounds[:-1], bounds[1:]))

    return record(out, tuple(tensors), vjp)


def stack(tensors, axis: int = 0) -> Tensor:
    """Stack equal-shaped tensors along a new ``axis`` (expand each, then ``concatenate``)."""
    tensors = [as_tensor(t) for t in tensors]
    if not tensors:
        raise ShapeError("stack: needs at least one tensor")
    for t in tensors[1:]:
        if t.dtype != tensors[0].dtype:
            raise TypeError(f"stack: dtypes {tensors[0].dtype} and {t.dtype} differ")
    ndim = tensors[0].ndim + 1
    axis = axis % ndim
    expanded = [reshape(t, t.shape[:axis] + (1,) + t.shape[axis:]) for t in tensors]
    return concatenate(expanded, axis=axis)


# --- matrix product -------------------------------------------------------------------------------


def matmul(a, b) -> Tensor:
    """a @ b over the last two axes, leading (batch) axes broadcast.

    VJP: (g @ b^T, a^T @ g) (``matmul_nt``, ``matmul_tn``), each summed back over broadcast batch axes.
    """
    a, b = _operands("matmul", a, b)
    return record(_product("matmul", a.data, b.data), (a, b), lambda g: _matmul_vjp(g, a, b))


def _matmul_vjp(g: Tensor, a: Tensor, b: Tensor) -> tuple:
    return (_unbroadcast(matmul_nt(g, b), a.shape) if _need(a) else None,
            _unbroadcast(matmul_tn(a, g), b.shape) if _need(b) else None)


def matmul_nt(a, b) -> Tensor:
    """a @ b^T (b transposed over its last two axes): ``matmul``'s VJP without a transpose node.

    VJP: (g @ b, g^T @ a). (The second is (a^T @ g)^T, the cotangent of b^T, computed the right way
    round: a contiguous array rather than a transposed view; see ``matmul_tn``.)
    """
    a, b = _operands("matmul_nt", a, b)

    def vjp(g):
        return (_unbroadcast(matmul(g, b), a.shape) if _need(a) else None,
                _unbroadcast(matmul_tn(g, a), b.shape) if _need(b) else None)

    return record(_product("matmul_nt", a.data, b.data.swapaxes(-1, -2)), (a, b), vjp)


def matmul_tn(a, b) -> Tensor:
    """a^T @ b (a transposed over its last two axes): ``matmul``'s VJP without a transpose node.

    VJP: (b @ g^T, a @ g). (The first is (g @ b^T)^T, the cotangent of a^T, computed the right way
    round: a contiguous array, where a transposed view made every later pass over it, such as the sums
    of a Hessian-vector product's cotangents, a strided one. Each entry is the same sum of products;
    NumPy's OpenBLAS gives the two forms the same bits in float32 at the experiments' shapes, not
    always in float64.)
    """
    a, b = _operands("matmul_tn", a, b)

    def vjp(g):
        return (_unbroadcast(matmul_nt(b, g), a.shape) if _need(a) else None,
                _unbroadcast(matmul(a, g), b.shape) if _need(b) else None)

    return record(_product("matmul_tn", a.data.swapaxes(-1, -2), b.data), (a, b), vjp)


def _product(op: str, a, b):
    """``a @ b`` on raw arrays (``kernels.matmul``), or a clear error naming ``op`` and the shapes."""
    if a.ndim < 2 or b.ndim < 2:
        raise ShapeError(f"{op}: both operands need at least 2 dimensions, got {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"{op}: inner dimensions differ: {a.shape} @ {b.shape}")
    try:
        return kernels.matmul(a, b)
    except ValueError as err:
        raise ShapeError(f"{op}: batch dimensions do not broadcast: {a.shape} @ {b.shape}") from err


def affine(x, w, b, relu: bool = False) -> Tensor:
    """x @ w + b, a dense layer as one node (instead of a matmul, a reshape of b and an add); with
    ``relu=True`` its ReLU too, max(x @ w + b, 0) = (x @ w + b) * [x @ w + b > 0] as ``relu`` computes it.

    ``x: (*lead, ..., N, in)``; ``w: (..., in, out)``, its batch axes broadcasting against x's as in
    ``matmul``; ``b: (*lead, out)``, ``lead`` being leading axes of x (the task axes, or none for a
    shared bias), added to every row. VJP: g times the constant mask (``relu=True``), then ``matmul``'s
    for x and w, and g summed over the rows (and the axes between ``lead`` and them) for b: the same
    operations as the separate nodes would record.
    """
    x, w = _operands("affine", x, w)
    x, b = _operands("affine", x, b)
    if b.ndim < 1 or b.shape[-1] != w.shape[-1] or b.shape[:-1] != x.shape[:b.ndim - 1] or b.ndim > x.ndim - 1:
        raise ShapeError(f"affine: bias {b.shape} does not fit input {x.shape} and weight {w.shape} "
                         f"(expected (*lead, out) with lead leading axes of the input)")
    out = _product("affine", x.data, w.data)
    rows = tuple(range(b.ndim - 1, out.ndim - 1))  # the axes b is repeated along
    out += b.data.reshape(b.shape[:-1] + (1,) * len(rows) + b.shape[-1:])
    if relu:
        mask = Tensor((out > 0).astype(out.dtype))
        out *= mask.data  # in place: the same product, no second array of the layer's size

    def vjp(g):
        if relu:
            g = multiply(g, mask)
        return _matmul_vjp(g, x, w) + (sum(g, axis=rows) if _need(b) else None,)

    return record(out, (x, w, b), vjp)


# --- operators on Tensor --------------------------------------------------------------------------

Tensor.__add__ = add
Tensor.__radd__ = lambda self, other: add(other, self)
Tensor.__sub__ = subtract
Tensor.__rsub__ = lambda self, other: subtract(other, self)
Tensor.__mul__ = multiply
Tensor.__rmul__ = lambda self, other: multiply(other, self)
Tensor.__truediv__ = divide
Tensor.__rtruediv__ = lambda self, other: divide(other, self)
Tensor.__neg__ = negative
Tensor.__pow__ = power
Tensor.__matmul__ = matmul
Tensor.__rmatmul__ = lambda self, other: matmul(other, self)
Tensor.__getitem__ = getitem
Tensor.sum = sum
Tensor.mean = mean
Tensor.max = max
Tensor.reshape = lambda self, *shape: reshape(self, shape[0] if len(shape) == 1 else shape)
Tensor.transpose = lambda self, *axes: transpose(self, axes[0] if len(axes) == 1 else (axes or None))
Tensor.T = property(lambda self: transpose(self))
