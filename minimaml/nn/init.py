"""Weight initialisers: seeded draws of a given shape and dtype on the generator's device.

Every initialiser takes ``rng`` (a generator from ``minimaml.backend.rng(seed)``), draws in float64 and
casts once to ``dtype``, so float32 and float64 parameters from the same seed are the same numbers
rounded. Fan-in and fan-out follow TensorFlow: for a dense weight ``(in, out)`` they are ``in`` and
``out``; for a conv filter ``(kh, kw, C_in, C_out)`` they are ``kh kw C_in`` and ``kh kw C_out``.

- ``truncated_normal``: N(0, std^2) with draws beyond 2 std redrawn (``tf.truncated_normal``).
- ``normal``: N(0, std^2) (``tf.random_normal``).
- ``glorot_uniform``: U(-l, l), l = sqrt(6 / (fan_in + fan_out)) (``xavier_initializer[_conv2d]``).
- ``fan_in_uniform``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's Linear/Conv2d default).
"""

from __future__ import annotations

import math

import numpy

from .. import backend


def fans(shape: tuple) -> tuple:
    """(fan_in, fan_out) of a weight ``(in, out)`` or a filter ``(kh, kw, C_in, C_out)``; a vector
    ``(n,)`` (a bias) has fan_in = fan_out = n."""
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return receptive * shape[-2], receptive * shape[-1]


def normal(rng, shape: tuple, std: float = 1.0, dtype=numpy.float32):
    """N(0, std^2) draws of ``shape``."""
    return (std * rng.standard_normal(shape)).astype(dtype)


def truncated_normal(rng, shape: tuple, std: float = 0.01, dtype=numpy.float32):
    """N(0, std^2) draws of ``shape`` conditioned on |z| <= 2 std: draws outside are redrawn."""
    z = rng.standard_normal(shape)
    xp = backend.array_namespace(z)
    outside = xp.abs(z) > 2.0
    while bool(outside.any()):
        z = xp.where(outside, rng.standard_normal(shape), z)
        outside = xp.abs(z) > 2.0
    return (std * z).astype(dtype)


def uniform(rng, shape: tuple, limit: float, dtype=numpy.float32):
    """U(-limit, limit) draws of ``shape``."""
    return (limit * (2.0 * rng.random(shape) - 1.0)).astype(dtype)


def glorot_uniform(rng, shape: tuple, dtype=numpy.float32):
    """Glorot/Xavier uniform: U(-l, l) with l = sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(shape)
    return uniform(rng, shape, math.sqrt(6.0 / (fan_in + fan_out)), dtype)


def fan_in_uniform(rng, shape: tuple, fan_in: int | None = None, dtype=numpy.float32):
    """PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)). A bias passes its layer's ``fan_in``."""
    if fan_in is None:
        fan_in = fans(shape)[0]
    return uniform(rng, shape, 1.0 / math.sqrt(fan_in), dtype)


def zeros(shape: tuple, dtype=numpy.float32):
    return backend.xp().zeros(shape, dtype=dtype)


def ones(shape: tuple, dtype=numpy.float32):
    return backend.xp().ones(shape, dtype=dtype)
