"""The paper's few-shot classifiers: the 4-block conv net (Omniglot, MiniImagenet) and the batch-normed
MLP (Omniglot "no conv"), as functional models ``init(rng, n_way, dtype) -> params`` and
``apply(params, x) -> logits``.

A conv block is ``conv 3x3 -> batch norm -> ReLU [-> 2x2 max-pool]``:

- Omniglot (``omniglot_conv4``): 64 filters, stride 2, SAME: 28 -> 14 -> 7 -> 4 -> 2; the features are
  the spatial mean of the last block (64, as the authors' code does; ``features="flatten"`` gives
  2x2x64 = 256), then a linear layer to ``n_way``.
- MiniImagenet (``miniimagenet_conv4``): 32 filters, stride 1, SAME, 2x2 max-pool:
  84 -> 42 -> 21 -> 10 -> 5; flatten 5x5x32 = 800, linear to ``n_way``.
- Omniglot MLP (``omniglot_mlp``): 784-256-128-64-64-n_way, each hidden layer linear -> batch norm -> ReLU.

Parameter names: ``conv{i}.w`` (3, 3, C_in, C_out), ``conv{i}.b`` (only with ``conv_bias``),
``conv{i}.bn.scale`` / ``conv{i}.bn.shift`` (C,), ``fc{i}.w``, ``fc{i}.b``, ``fc{i}.bn.*`` for the MLP,
``head.w`` (features, n_way), ``head.b`` (n_way). Any of them may carry a leading task axis
(see ``layers``). Images are channel-last: ``x: (*task, N, H, W, C)``; MLP inputs ``(*task, N, 784)``.

Initialisation, ``init_scheme="authors"`` (cbfinn/maml, ``maml.py``): conv filters Glorot uniform
(``xavier_initializer_conv2d``), biases 0, batch-norm scale 1 and shift 0; the head is N(0, 1)
(``tf.random_normal``) for Omniglot's conv net, Glorot uniform for MiniImagenet's, truncated normal
std 0.01 for every MLP weight. ``init_scheme="pytorch"``: every weight and bias U(+-1/sqrt(fan_in)), as
PyTorch's layers and the W2 benchmark do.

Differences from the authors' code, each a flag: their ``tf.contrib.layers.batch_norm`` has no scale
(``bn_scale=False`` reproduces that) and eps 1e-3 (``bn_eps``); their conv layers have a bias, which
training-mode batch norm cancels exactly (zero gradient), so it is off by default (``conv_bias``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from .. import autodiff as ad
from .. import backend
from . import init as initializers
from .layers import batch_norm, conv2d, flatten, linear, max_pool2x2

INIT_SCHEMES = ("authors", "pytorch")


def inner_param_names(params: dict, adapt_bn_shift: bool = True) -> list:
    """The names of the parameters adapted in MAML's inner loop, in ``params`` order.

    ``adapt_bn_shift=False`` leaves every batch-norm shift (``*.bn.shift``) to the outer loop only, as in
    the paper's code, where the batch-norm variables live outside the adapted weight dict ("its shift is
    meta-learned"). ``True`` adapts everything (the W2 benchmark).
    """
    return [name for name in params if adapt_bn_shift or not name.endswith(".bn.shift")]


def _batch_norm_params(params: dict, prefix: str, channels: int, scale: bool, dtype) -> None:
    if scale:
        params[f"{prefix}.bn.scale"] = initializers.ones((channels,), dtype)
    params[f"{prefix}.bn.shift"] = initializers.zeros((channels,), dtype)


def _check_params(params, model: str) -> None:
    """Refuse parameters that are not a dict of named arrays (e.g. a list of its values)."""
    if not isinstance(params, dict):
        raise TypeError(f"{model}.apply: params must be a dict of named arrays, as {model}.init returns; "
                        f"got a {type(params).__name__}")


def _check_scheme(scheme: str) -> None:
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init_scheme {scheme!r}: expected one of {INIT_SCHEMES}")


@dataclass(frozen=True)
class Conv4:
    """Four conv blocks and a linear head (see the module docstring for the two standard settings).

    ``image_size``, ``in_channels``: the input images. ``filters``, ``stride``, ``padding``: every conv
    (``padding`` as in ``layers.conv2d``). ``max_pool``: a 2x2 max-pool ends each block. ``features``:
    ``"mean"`` (spatial mean of the last block) or ``"flatten"`` (H, W, C order). ``bn_eps``,
    ``bn_scale``, ``conv_bias``, ``init_scheme``: see the module docstring.
    """

    image_size: int = 28
    in_channels: int = 1
    filters: int = 64
    stride: int = 2
    padding: object = "SAME"
    max_pool: bool = False
    features: str = "mean"
    bn_eps: float = 1e-3
    bn_scale: bool = True
    conv_bias: bool = False
    init_scheme: str = "authors"

    def feature_size(self) -> int:
        """Length of the feature vector fed to the head."""
        if self.features == "mean":
            return self.filters
        size = self.image_size
        for _ in range(4):
            if self.padding == "SAME":
                pad = sum(ad.same_padding(size, 3, self.stride))
            else:
                pad = 0 if self.padding == "VALID" else 2 * self.padding
            size = (size + pad - 3) // self.stride + 1
            if self.max_pool:
                size //= 2
        return size * size * self.filters

    def init(self, rng, n_way: int, dtype=numpy.float32) -> dict:
        """Seeded parameters (``init_scheme``: see the module docstring)."""
        _check_scheme(self.init_scheme)
        authors = self.init_scheme == "authors"
        params = {}
        c_in = self.in_channels
        for i in range(4):
            shape = (3, 3, c_in, self.filters)
            params[f"conv{i}.w"] = (initializers.glorot_uniform(rng, shape, dtype) if authors
                                    else initializers.fan_in_uniform(rng, shape, dtype=dtype))
            if self.conv_bias:
                params[f"conv{i}.b"] = (initializers.zeros((self.filters,), dtype) if authors
                                        else initializers.fan_in_uniform(rng, (self.filters,), 9 * c_in, dtype))
            _batch_norm_params(params, f"conv{i}", self.filters, self.bn_scale, dtype)
            c_in = self.filters
        shape = (self.feature_size(), n_way)
        if not authors:
            params["head.w"] = initializers.fan_in_uniform(rng, shape, dtype=dtype)
            params["head.b"] = initializers.fan_in_uniform(rng, (n_way,), shape[0], dtype)
        else:
            params["head.w"] = (initializers.normal(rng, shape, 1.0, dtype) if self.features == "mean"
                                else initializers.glorot_uniform(rng, shape, dtype))
            params["head.b"] = initializers.zeros((n_way,), dtype)
        return {name: backend.asarray(p) for name, p in params.items()}  # a host rng's draws, moved

    def apply(self, params: dict, x):
        """Logits ``(*task, N, n_way)`` of images ``x: (*task, N, H, W, C)``; batch statistics per task."""
        _check_params(params, "Conv4")
        h = x
        for i in range(4):
            h = conv2d(h, params[f"conv{i}.w"], params.get(f"conv{i}.b"), self.stride, self.padding)
            h = batch_norm(h, params.get(f"conv{i}.bn.scale"), params[f"conv{i}.bn.shift"], self.bn_eps, relu=True)
            if self.max_pool:
                h = max_pool2x2(h)
        h = ad.mean(h, axis=(-3, -2)) if self.features == "mean" else flatten(h, keep=h.ndim - 3)
        return linear(h, params["head.w"], params["head.b"])


@dataclass(frozen=True)
class BatchNormMLP:
    """Linear -> batch norm -> ReLU hidden layers, then a linear head: the paper's Omniglot "no conv"
    net with ``hidden = (256, 128, 64, 64)`` and 28x28 = 784 inputs. ``init_scheme="authors"``: every
    weight truncated normal std 0.01, biases 0; ``"pytorch"``: U(+-1/sqrt(fan_in)).
    """

    in_features: int = 784
    hidden: tuple = (256, 128, 64, 64)
    bn_eps: float = 1e-3
    bn_scale: bool = True
    init_scheme: str = "authors"

    def init(self, rng, n_way: int, dtype=numpy.float32) -> dict:
        """Seeded parameters ``fc{i}.w (in, out)``, ``fc{i}.b``, ``fc{i}.bn.*``, ``head.w``, ``head.b``."""
        _check_scheme(self.init_scheme)
        params = {}
        sizes = (self.in_features, *self.hidden, n_way)
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            name = "head" if i == len(self.hidden) else f"fc{i}"
            if self.init_scheme == "authors":
                params[f"{name}.w"] = initializers.truncated_normal(rng, (fan_in, fan_out), 0.01, dtype)
                params[f"{name}.b"] = initializers.zeros((fan_out,), dtype)
            else:
                params[f"{name}.w"] = initializers.fan_in_uniform(rng, (fan_in, fan_out), dtype=dtype)
                params[f"{name}.b"] = initializers.fan_in_uniform(rng, (fan_out,), fan_in, dtype)
            if name != "head":
                _batch_norm_params(params, name, fan_out, self.bn_scale, dtype)
        return params

    def apply(self, params: dict, x):
        """Logits ``(*task, N, n_way)`` of flat inputs ``x: (*task, N, in_features)`` (or images
        ``(*task, N, H, W, 1)``, flattened first)."""
        _check_params(params, "BatchNormMLP")
        if ad.as_tensor(x).shape[-1] != self.in_features:
            x = flatten(x, keep=ad.as_tensor(x).ndim - 3)
        h = x
        for i in range(len(self.hidden)):
            h = linear(h, params[f"fc{i}.w"], params[f"fc{i}.b"])
            h = batch_norm(h, params.get(f"fc{i}.bn.scale"), params[f"fc{i}.bn.shift"], self.bn_eps,
                           example_axes=1, relu=True)
        return linear(h, params["head.w"], params["head.b"])


def omniglot_conv4(**overrides) -> Conv4:
    """The paper's Omniglot net: 64 filters, stride 2, SAME, no pooling, spatial-mean features."""
    return Conv4(**{"image_size": 28, "in_channels": 1, "filters": 64, "stride": 2, "max_pool": False,
                    "features": "mean", **overrides})


def miniimagenet_conv4(**overrides) -> Conv4:
    """The paper's MiniImagenet net: 32 filters, stride 1, SAME, 2x2 max-pool, 800 flattened features."""
    return Conv4(**{"image_size": 84, "in_channels": 3, "filters": 32, "stride": 1, "max_pool": True,
                    "features": "flatten", **overrides})


def omniglot_mlp(**overrides) -> BatchNormMLP:
    """The paper's Omniglot "no conv" net: 784-256-128-64-64-N."""
    return BatchNormMLP(**overrides)
