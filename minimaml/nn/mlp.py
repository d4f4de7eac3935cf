"""The paper's sinusoid regressor: a multilayer perceptron 1-40-40-1 with ReLU (or another activation).

``init(rng) -> params`` and ``apply(params, x)``. Parameters are named ``layer{i}.w`` ``(in, out)`` and
``layer{i}.b`` ``(out,)``; with a leading task axis, ``(T, in, out)`` and ``(T, out)`` and the input
``(T, N, in)``, all T tasks run in one batched call.
"""

from __future__ import annotations

import numpy

from .. import autodiff as ad
from .. import backend
from .init import fan_in_uniform, truncated_normal
from .layers import linear

PAPER_SIZES = (1, 40, 40, 1)


def init(rng, sizes=PAPER_SIZES, scheme: str = "paper", dtype=numpy.float32) -> dict:
    """Parameters of an MLP with layer ``sizes``.

    ``scheme="paper"``: as the authors' code, weights from a normal truncated at two standard
    deviations with std 0.01, zero biases. ``scheme="uniform"``: PyTorch's ``nn.Linear`` default,
    weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the benchmark workloads use it).
    ``rng``: a ``numpy.random.Generator`` (draws are made on the host, then moved to the device).
    """
    if scheme not in ("paper", "uniform"):
        raise ValueError(f"mlp.init: unknown scheme {scheme!r}: expected 'paper' or 'uniform'")
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if scheme == "paper":
            w = truncated_normal(rng, (fan_in, fan_out), std=0.01, dtype=dtype)
            b = numpy.zeros(fan_out, dtype=dtype)
        else:
            w = fan_in_uniform(rng, (fan_in, fan_out), fan_in, dtype=dtype)
            b = fan_in_uniform(rng, (fan_out,), fan_in, dtype=dtype)
        params[f"layer{i}.w"] = backend.asarray(w)
        params[f"layer{i}.b"] = backend.asarray(b)
    return params


def apply(params: dict, x, activation=ad.relu) -> ad.Tensor:
    """y = W_L f(... f(W_0 x + b_0) ...) + b_L for ``x: (*task, N, in)``; returns ``(*task, N, out)``.
    ``activation``: f, ReLU by default (the paper's); e.g. ``ad.tanh`` for a smooth network
    (``functools.partial(mlp.apply, activation=ad.tanh)`` is then the model's ``apply``)."""
    if not isinstance(params, dict):
        raise TypeError(f"mlp.apply: params must be a dict of named arrays (layer0.w, layer0.b, ...), as "
                        f"mlp.init returns; got a {type(params).__name__}")
    n_layers = sum(1 for name in params if name.startswith("layer") and name.endswith(".w"))
    h = x
    for i in range(n_layers):
        w, b = params[f"layer{i}.w"], params[f"layer{i}.b"]
        if i == n_layers - 1:
            h = linear(h, w, b)
        elif activation is ad.relu:
            h = linear(h, w, b, relu=True)  # the layer and its ReLU as one node, the same arithmetic
        else:
            h = activation(linear(h, w, b))
    return h
