"""The few-shot classifiers: shapes and parameter names of the paper's settings, initialisers, second
derivatives of whole (tiny) models, task batching, and which parameters the inner loop adapts."""

import math

import numpy
import pytest

from minimaml import autodiff as ad
from minimaml import backend
from minimaml.autodiff import check_grads
from minimaml.nn import init
from minimaml.nn.conv4 import (BatchNormMLP, Conv4, inner_param_names, miniimagenet_conv4, omniglot_conv4,
                               omniglot_mlp)

T = 2


def randn(*shape, seed=0):
    return numpy.random.default_rng([seed, *shape]).standard_normal(shape)


def same_padding(size: int, stride: int) -> tuple:
    """TensorFlow's 'SAME' for a 3x3 filter: output ceil(size / stride), the odd zero at the end."""
    total = max((-(-size // stride) - 1) * stride + 3 - size, 0)
    return total // 2, total - total // 2


def numpy_conv3x3(x, w, stride: int, padding: int | str):
    """out[p, o] = sum_{i, j, c} x_pad[stride p + (i, j), c] w[i, j, c, o], one filter tap at a time."""
    rows = same_padding(x.shape[-3], stride) if padding == "SAME" else (padding, padding)
    cols = same_padding(x.shape[-2], stride) if padding == "SAME" else (padding, padding)
    x = numpy.pad(x, [(0, 0)] * (x.ndim - 3) + [rows, cols, (0, 0)])
    height, width = (x.shape[-3] - 3) // stride + 1, (x.shape[-2] - 3) // stride + 1
    return sum(x[..., i:i + stride * (height - 1) + 1:stride, j:j + stride * (width - 1) + 1:stride, :] @ w[i, j]
               for i in range(3) for j in range(3))


def numpy_batch_norm_relu(h, scale, shift, eps: float, axes: tuple):
    """relu(scale (h - mean) / sqrt(var + eps) + shift), statistics of each task over ``axes``."""
    mean, var = h.mean(axis=axes, keepdims=True), h.var(axis=axes, keepdims=True)
    return numpy.maximum(scale * (h - mean) / numpy.sqrt(var + eps) + shift, 0.0)


def numpy_logits(model, p: dict, x):
    """The paper's nets written out in NumPy for one leading task axis: ``x (T, N, ...)``."""
    if isinstance(model, BatchNormMLP):
        h = x.reshape(*x.shape[:2], -1)
        for i in range(len(model.hidden)):
            h = numpy_batch_norm_relu(h @ p[f"fc{i}.w"] + p[f"fc{i}.b"], p[f"fc{i}.bn.scale"],
                                      p[f"fc{i}.bn.shift"], model.bn_eps, axes=(1,))
    else:
        h = x
        for i in range(4):
            h = numpy_conv3x3(h, p[f"conv{i}.w"], model.stride, model.padding)
            h = numpy_batch_norm_relu(h, p[f"conv{i}.bn.scale"], p[f"conv{i}.bn.shift"], model.bn_eps,
                                      axes=(1, 2, 3))
            if model.max_pool:  # 2x2 blocks, an odd last row / column dropped
                rows, cols = h.shape[2] // 2, h.shape[3] // 2
                h = h[:, :, :2 * rows, :2 * cols].reshape(*h.shape[:2], rows, 2, cols, 2, -1).max(axis=(3, 5))
        h = h.mean(axis=(2, 3)) if model.features == "mean" else h.reshape(*h.shape[:2], -1)
    return h @ p["head.w"] + p["head.b"]


@pytest.mark.parametrize("model, image, features", [
    (omniglot_conv4(), (28, 28, 1), 64),
    (omniglot_conv4(features="flatten"), (28, 28, 1), 256),
    (miniimagenet_conv4(), (84, 84, 3), 800),
    (omniglot_mlp(), (28, 28, 1), 64),
])
def test_paper_models_logits_equal_a_numpy_forward(model, image, features):
    """Each of the paper's nets, in float32 as initialised, gives the logits of the same net written out
    in NumPy (float64; taps of the convolution, TensorFlow's SAME padding, per-task batch statistics,
    2x2 pooling, mean or flattened features) to float32 precision. Every parameter is moved off its
    initial value first, so that a scale, shift or bias used in the wrong place changes the logits."""
    params = model.init(backend.rng(0), n_way=5)
    assert params["head.w"].shape == (features, 5)
    assert all(p.dtype == numpy.float32 for p in params.values())
    params = {k: (p + 0.5 * randn(*p.shape, seed=i)).astype(numpy.float32)
              for i, (k, p) in enumerate(params.items())}
    x = randn(T, 3, *image).astype(numpy.float32)
    logits = model.apply(params, x)
    assert logits.shape == (T, 3, 5) and logits.dtype == numpy.float32
    expected = numpy_logits(model, {k: p.astype(numpy.float64) for k, p in params.items()}, x.astype(numpy.float64))
    numpy.testing.assert_allclose(logits.data, expected, rtol=1e-4, atol=1e-4 * numpy.abs(expected).max())


def test_parameter_names_and_counts():
    params = omniglot_conv4().init(backend.rng(0), n_way=5)
    assert list(params) == [f"conv{i}.{k}" for i in range(4) for k in ("w", "bn.scale", "bn.shift")] + [
        "head.w", "head.b"]
    assert params["conv1.w"].shape == (3, 3, 64, 64)
    mlp = omniglot_mlp().init(backend.rng(0), n_way=20)
    assert sum(p.size for p in mlp.values()) == (784 * 256 + 256 * 128 + 128 * 64 + 64 * 64 + 64 * 20
                                                 + 256 + 128 + 64 + 64 + 20 + 2 * (256 + 128 + 64 + 64))
    with_bias = omniglot_conv4(conv_bias=True, bn_scale=False).init(backend.rng(0), n_way=5)
    assert "conv0.b" in with_bias and "conv0.bn.scale" not in with_bias


def test_initialisers_follow_their_laws():
    rng = backend.rng(0)
    w = init.glorot_uniform(rng, (3, 3, 64, 32))
    assert numpy.abs(w).max() <= math.sqrt(6 / (9 * 64 + 9 * 32))
    assert abs(w.std() - math.sqrt(6 / (9 * 96)) / math.sqrt(3)) < 1e-3
    z = init.truncated_normal(rng, (100_000,), std=0.01)
    assert numpy.abs(z).max() <= 0.02 and 0.0085 < z.std() < 0.0090  # 0.01 * 0.8796
    u = init.fan_in_uniform(rng, (256, 5))
    assert numpy.abs(u).max() <= 1 / 16 and u.dtype == numpy.float32
    a = init.glorot_uniform(backend.rng(3), (4, 4), numpy.float64)
    b = init.glorot_uniform(backend.rng(3), (4, 4), numpy.float32)
    numpy.testing.assert_array_equal(a.astype(numpy.float32), b)  # same draws, rounded


def test_authors_and_pytorch_heads():
    authors = omniglot_conv4().init(backend.rng(0), n_way=5, dtype=numpy.float64)
    assert 0.8 < authors["head.w"].std() < 1.2 and not authors["head.b"].any()  # N(0, 1), zero bias
    torch_like = omniglot_conv4(init_scheme="pytorch").init(backend.rng(0), n_way=5)
    assert numpy.abs(torch_like["head.b"]).max() <= 1 / 8 and torch_like["head.b"].any()
    with pytest.raises(ValueError, match="init_scheme"):
        omniglot_conv4(init_scheme="lecun").init(backend.rng(0), n_way=5)


TINY_CONV = Conv4(image_size=6, in_channels=1, filters=2, stride=2, features="flatten", bn_eps=1e-3)
TINY_POOL = Conv4(image_size=16, in_channels=2, filters=2, stride=1, max_pool=True, features="flatten")
TINY_MLP = BatchNormMLP(in_features=4, hidden=(3, 3))


def loss_fn(model, x, labels):
    """Summed-over-tasks cross-entropy as a function of the parameter arrays, in ``params`` order."""
    names = list(model.init(backend.rng(0), n_way=2))

    def f(*arrays):
        return ad.sum(ad.softmax_cross_entropy(model.apply(dict(zip(names, arrays)), x), labels))
    return f


@pytest.mark.parametrize("model, image", [(TINY_CONV, (6, 6, 1)), (TINY_POOL, (16, 16, 2)), (TINY_MLP, (4,))])
def test_whole_model_second_order(model, image):
    params = model.init(backend.rng(1), n_way=2, dtype=numpy.float64)
    per_task = [numpy.broadcast_to(p, (T, *p.shape)) + 0.1 * randn(T, *p.shape, seed=i)
                for i, p in enumerate(params.values())]
    x, labels = randn(T, 4, *image), numpy.tile([0, 1, 1, 0], (T, 1))
    # a small step: a whole net has many ReLU and max-pool kinks for a finite difference to straddle
    check_grads(loss_fn(model, x, labels), per_task, order=2, rtol=1e-5, step=1e-6)


def test_model_task_batch_equals_per_task_loop():
    model = omniglot_conv4(image_size=8, filters=3)
    params = model.init(backend.rng(2), n_way=3, dtype=numpy.float64)
    per_task = {k: numpy.broadcast_to(p, (T, *p.shape)) + 0.1 * randn(T, *p.shape, seed=i)
                for i, (k, p) in enumerate(params.items())}
    per_task["conv2.bn.shift"] = params["conv2.bn.shift"]  # an unadapted, shared parameter
    x = randn(T, 4, 8, 8, 1)
    batched = model.apply(per_task, x).data
    for t in range(T):
        single = {k: p[t] if p.ndim > params[k].ndim else p for k, p in per_task.items()}
        numpy.testing.assert_allclose(batched[t], model.apply(single, x[t]).data, rtol=1e-12)


def test_inner_param_names():
    params = omniglot_conv4().init(backend.rng(0), n_way=5)
    assert inner_param_names(params) == list(params)
    kept = inner_param_names(params, adapt_bn_shift=False)
    assert kept == [k for k in params if not k.endswith("bn.shift")] and "conv0.bn.scale" in kept
