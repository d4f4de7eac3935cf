"""A small reverse-mode autodiff tape over NumPy/CuPy arrays, differentiable to any order.

    from minimaml import autodiff as ad
    x = ad.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (g,) = ad.grad(ad.sum(ad.tanh(x) ** 2), [x])
"""

from . import ops
from .check import GradCheckError, GradCheckReport, check_grads
from .nnops import (batch_normalize, col2im, conv2d, im2col, log_softmax, logsumexp, max_pool2x2, mse,
                    one_hot, same_padding, softmax_cross_entropy)
from .ops import (ShapeError, abs, add, affine, as_tensor, broadcast_to, concatenate, divide, exp, getitem,
                  gradient_step, log, matmul, max, maximum, mean, multiply, negative, power, relu, reshape,
                  scatter_add, sigmoid, sqrt, stack, subtract, sum, swapaxes, tanh, transpose, where)
from .tensor import Tensor, grad, is_recording, no_grad


def value_and_grad(f, params: dict) -> tuple:
    """(f(params) as a float, its gradient as a dict of arrays named like ``params``) for a scalar-valued
    ``f`` of a dict of named arrays (or Tensors, whose values are taken): one forward pass on fresh
    leaves, one reverse pass."""
    leaves = {n: Tensor(p.data if isinstance(p, Tensor) else p, requires_grad=True) for n, p in params.items()}
    value = f(leaves)
    grads = grad(value, list(leaves.values()))
    return float(value.data), {n: g.data for n, g in zip(leaves, grads)}


def gradient_product(grads, leaves):
    """``vector -> grad_leaves <grads, vector>`` (``vector`` constant arrays shaped like ``grads``), one
    reverse pass each, for gradients ``grads`` recorded (``grad(..., create_graph=True)``) from ``leaves``:
    the Hessian-vector product when ``grads`` is grad f w.r.t. ``leaves``; with more ``leaves`` than
    ``grads`` (grad f w.r.t. some of them), the mixed second derivatives d/dy <grad_x f, v> too. Returns
    a list of arrays, one per leaf."""
    def product(vector):
        inner = sum(multiply(grads[0], Tensor(vector[0])))
        for g, v in zip(grads[1:], vector[1:]):
            inner = inner + sum(multiply(g, Tensor(v)))
        return [h.data for h in grad(inner, leaves)]

    return product


def hessian_product(f, params):
    """The Hessian of the scalar ``f(*params)`` at ``params`` as a function ``vector -> H v`` (reverse
    over reverse): grad f is recorded once, and each product H v = grad_x <grad_x f(x), v> (v constant)
    is one more reverse pass through it (``gradient_product``). ``params``, ``vector``: lists of arrays;
    returns a list of arrays."""
    leaves = [Tensor(p, requires_grad=True) for p in params]
    return gradient_product(grad(f(*leaves), leaves, create_graph=True), leaves)


def hvp(f, params, vector):
    """Exact Hessian-vector product H v of the scalar ``f(*params)`` (``hessian_product`` for one
    vector). ``params``, ``vector``: lists of arrays. Returns a list of arrays."""
    return hessian_product(f, params)(vector)
