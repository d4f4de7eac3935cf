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


@pytest.mark.parametrize("model, image, features", [
    (omniglot_conv4(), (28, 28, 1), 64),
    (omniglot_conv4(features="flatten"), (28, 28, 1), 256),
    (miniimagenet_conv4(), (84, 84, 3), 800),
    (omniglot_mlp(), (28, 28, 1), 64),
])
def test_paper_models_shapes_and_dtype(model, image, features):
    params = model.init(backend.rng(0), n_way=5)
    assert params["head.w"].shape == (features, 5)
    assert all(p.dtype == numpy.float32 for p in params.values())
    logits = model.apply(params, randn(T, 3, *image).astype(numpy.float32))
    assert logits.shape == (T, 3, 5) and logits.dtype == numpy.float32


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
