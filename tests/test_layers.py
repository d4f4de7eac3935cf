"""Functional layers: first and second derivatives against finite differences (float64), task-axis
batching equal to a per-task loop, shared (task-free) parameters broadcasting, dtypes, shape errors."""

import numpy
import pytest

from minimaml import autodiff as ad
from minimaml.autodiff import ShapeError, Tensor, check_grads
from minimaml.nn import layers

T = 2  # tasks


def randn(*shape, seed=0):
    return numpy.random.default_rng([seed, *shape]).standard_normal(shape)


# --- derivatives ----------------------------------------------------------------------------------


def test_linear_task_axis_second_order():
    x, w, b = randn(T, 3, 4), randn(T, 4, 3, seed=1), randn(T, 3, seed=2)
    check_grads(lambda x, w, b: ad.tanh(layers.linear(x, w, b)), [x, w, b], order=2)


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_with_relu_is_relu_of_linear_bit_for_bit(with_bias):
    """``relu=True`` (fused into ``affine`` when there is a bias) gives relu(linear(x)): the same float32
    value, gradient and second derivative."""
    x, w, b = (a.astype(numpy.float32) for a in (randn(T, 3, 4), randn(4, 5, seed=1), randn(T, 5, seed=2)))

    def through(f):
        leaves = [ad.Tensor(a, requires_grad=True) for a in (x, w, b)]
        out = f(leaves[0], leaves[1], leaves[2] if with_bias else None)
        first = ad.grad(ad.sum(out * out * ad.tanh(out)), leaves[:2 + with_bias], create_graph=True)
        second = ad.grad(sum(ad.sum(g * g) for g in first), leaves[:2 + with_bias])
        return [out.data] + [g.data for g in first + second]

    fused = through(lambda x, w, b: layers.linear(x, w, b, relu=True))
    separate = through(lambda x, w, b: ad.relu(layers.linear(x, w, b)))
    assert (fused[0] == 0).any() and (fused[0] > 0).any()
    for one, other in zip(fused, separate):
        numpy.testing.assert_array_equal(one, other)


def test_linear_shared_weight_second_order():
    x, w, b = randn(T, 3, 4), randn(4, 3, seed=1), randn(3, seed=2)
    check_grads(lambda x, w, b: ad.tanh(layers.linear(x, w, b)), [x, w, b], order=2)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_same_second_order(stride):
    x, w, b = randn(T, 2, 5, 5, 2), randn(T, 3, 3, 2, 3, seed=1), randn(T, 3, seed=2)
    report = check_grads(lambda x, w, b: ad.tanh(layers.conv2d(x, w, b, stride=stride)), [x, w, b], order=2)
    assert report.ok


def test_conv2d_symmetric_padding_shared_filters():
    x, w = randn(T, 2, 4, 4, 1), randn(3, 3, 1, 2, seed=1)
    check_grads(lambda x, w: ad.tanh(layers.conv2d(x, w, stride=2, padding=1)), [x, w], order=2)


def test_batch_norm_images_per_task_second_order():
    x, scale, shift = randn(T, 3, 2, 2, 2), randn(T, 2, seed=1), randn(T, 2, seed=2)
    check_grads(lambda x, s, b: ad.tanh(layers.batch_norm(x, s, b, eps=1e-3)), [x, scale, shift], order=2)


def test_batch_norm_features_shared_params_second_order():
    x, scale, shift = randn(T, 4, 3), randn(3, seed=1), randn(3, seed=2)
    check_grads(lambda x, s, b: ad.tanh(layers.batch_norm(x, s, b, eps=1e-5, example_axes=1)),
                [x, scale, shift], order=2)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_with_relu_is_relu_of_batch_norm(training):
    """``relu=True`` (fused into the batch-norm primitive in training mode) gives relu(batch_norm(x))
    in value, gradient and second derivative; also with running statistics."""
    x, scale, shift = randn(T, 3, 2, 2, 2), randn(T, 2, seed=1), randn(2, seed=2)
    stats = layers.RunningStats(numpy.full(2, 0.1), numpy.full(2, 1.5))

    def fused(x, s, b):
        return layers.batch_norm(x, s, b, eps=1e-3, running=stats, training=training, relu=True)

    def separate(x, s, b):
        return ad.relu(layers.batch_norm(x, s, b, eps=1e-3, running=stats, training=training))

    for f in (fused, separate):
        check_grads(lambda x, s, b: f(x, s, b) * x, [x, scale, shift], order=2)
    leaves = [ad.Tensor(a, requires_grad=True) for a in (x, scale, shift)]
    outputs = [f(*leaves) for f in (fused, separate)]
    numpy.testing.assert_allclose(outputs[0].data, outputs[1].data, rtol=1e-12, atol=1e-12)
    grads = [ad.grad(ad.sum(out * out * out), leaves) for out in outputs]
    for a, b in zip(*grads):
        numpy.testing.assert_allclose(a.data, b.data, rtol=1e-10, atol=1e-12)


def test_max_pool_and_relu_second_order():
    x = randn(T, 2, 5, 4, 2)  # odd height: the last row is dropped
    check_grads(lambda x: ad.relu(layers.max_pool2x2(x)) * x.sum(), [x], order=2)


# --- values ---------------------------------------------------------------------------------------


def test_batch_norm_normalises_each_task_and_channel():
    x = 3.0 + 2.0 * randn(T, 4, 3, 3, 2)
    y = layers.batch_norm(x, eps=0.0).data
    numpy.testing.assert_allclose(y.mean(axis=(1, 2, 3)), 0.0, atol=1e-12)
    numpy.testing.assert_allclose(y.var(axis=(1, 2, 3)), 1.0, atol=1e-12)


def test_conv2d_same_output_sizes():
    x = randn(1, 1, 28, 28, 1)
    sizes = []
    for _ in range(4):
        x = layers.conv2d(x, randn(3, 3, 1, 1), stride=2).data
        sizes.append(x.shape[2])
    assert sizes == [14, 7, 4, 2]


def block(x, w, scale, shift):
    """conv -> batch norm -> ReLU -> pool -> flatten -> linear: one of each layer."""
    h = layers.conv2d(x, w, stride=1)
    h = layers.max_pool2x2(ad.relu(layers.batch_norm(h, scale, shift)))
    return layers.flatten(h, keep=h.ndim - 3)


def test_task_axis_equals_per_task_loop():
    x, w = randn(T, 3, 4, 4, 2), randn(T, 3, 3, 2, 3, seed=1)
    scale, shift = randn(T, 3, seed=2), randn(3, seed=3)  # shift shared by the tasks (not adapted)
    head = randn(T, 12, 2, seed=4)
    batched = layers.linear(block(x, w, scale, shift), head).data
    for t in range(T):
        single = layers.linear(block(x[t], w[t], scale[t], shift), head[t]).data
        numpy.testing.assert_allclose(batched[t], single, rtol=1e-12)


def test_shared_params_equal_tiled_params():
    x, w, scale, shift = randn(T, 3, 4, 4, 2), randn(3, 3, 2, 3), randn(3, seed=1), randn(3, seed=2)
    tile = lambda p: numpy.broadcast_to(p, (T, *p.shape)).copy()
    shared = block(x, w, scale, shift).data
    tiled = block(x, tile(w), tile(scale), tile(shift)).data
    numpy.testing.assert_allclose(shared, tiled, rtol=1e-12)


def test_float32_stays_float32_and_matches_float64():
    """A float32 forward and backward pass through one of each layer stays float32 (no silent upcast)
    and equals the same computation in float64 to float32 precision: a lower-precision step, or a
    term lost on the float32 path only, would not."""
    arrays = [randn(T, 3, 4, 4, 2), randn(T, 3, 3, 2, 3), randn(3, seed=1), randn(3, seed=2),
              randn(T, 12, 2), randn(2, seed=3)]
    arrays = [a.astype(numpy.float32) for a in arrays]  # both runs start from the same float32 values

    def values_and_grads(dtype):
        leaves = [Tensor(a.astype(dtype), requires_grad=True) for a in arrays]
        x, w, scale, shift, head, bias = leaves
        y = layers.linear(block(x, w, scale, shift), head, bias)
        return [y.data] + [g.data for g in ad.grad(ad.sum(ad.tanh(y)), leaves)]

    for single, double in zip(values_and_grads(numpy.float32), values_and_grads(numpy.float64)):
        assert single.dtype == numpy.float32
        numpy.testing.assert_allclose(single, double, rtol=1e-5, atol=1e-6 * numpy.abs(double).max())


def test_running_stats_are_updated_and_used_at_evaluation():
    x = 2.0 + randn(T, 8, 3)
    stats = layers.RunningStats(numpy.zeros(3), numpy.ones(3), momentum=1.0)
    train = layers.batch_norm(x, eps=0.0, example_axes=1, running=stats).data
    numpy.testing.assert_allclose(stats.mean, x.mean(axis=1).mean(axis=0))
    evaluated = layers.batch_norm(x, eps=0.0, example_axes=1, running=stats, training=False)
    expected = (x - stats.mean) / numpy.sqrt(stats.var)
    numpy.testing.assert_allclose(evaluated.data, expected)
    assert not numpy.allclose(evaluated.data, train)  # the tasks' own statistics differ from the average
    with pytest.raises(ValueError, match="running"):
        layers.batch_norm(x, example_axes=1, training=False)


def test_gradients_reach_per_task_and_shared_params():
    """L = sum (x w + b)^2 with per-task weights w (T, 4, 2) and a bias b (2,) shared by the tasks:
    dL/dw_t = x_t^T 2 y_t for each task alone, and dL/db = sum over tasks and examples of 2 y."""
    x = randn(T, 3, 4)
    w, b = Tensor(randn(T, 4, 2), requires_grad=True), Tensor(randn(2), requires_grad=True)
    gw, gb = ad.grad(ad.sum(layers.linear(x, w, b) ** 2), [w, b])
    y = x @ w.data + b.data
    numpy.testing.assert_allclose(gw.data, [x[t].T @ (2 * y[t]) for t in range(T)], rtol=1e-12)
    numpy.testing.assert_allclose(gb.data, (2 * y).sum(axis=(0, 1)), rtol=1e-12)


# --- errors ---------------------------------------------------------------------------------------


def test_shape_errors_name_the_layer_and_shapes():
    with pytest.raises(ShapeError, match=r"linear: input \(2, 3, 4\) does not fit weight \(5, 3\)"):
        layers.linear(randn(T, 3, 4), randn(5, 3))
    with pytest.raises(ShapeError, match="leading task axes"):
        layers.linear(randn(T, 3, 4), randn(3, 4, 2))  # 3 tasks of weights for 2 tasks of data
    with pytest.raises(ShapeError, match="batch_norm: scale has 4 channels"):
        layers.batch_norm(randn(T, 3, 2, 2, 3), randn(4), randn(3))
    with pytest.raises(ShapeError, match="batch_norm"):
        layers.batch_norm(randn(T, 3, 2, 2, 3), randn(3, 3), randn(3))
    with pytest.raises(ShapeError, match="conv2d: bias"):
        layers.conv2d(randn(T, 1, 4, 4, 2), randn(3, 3, 2, 3), randn(4))
    with pytest.raises(ShapeError, match="flatten"):
        layers.flatten(randn(2, 3), keep=2)
