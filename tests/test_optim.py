"""SGD and Adam against their update equations written out by hand (float64), plus the API contract:
no mutation, dtype kept, clipping, clear errors."""

import numpy
import pytest

from minimaml import backend
from minimaml.optim import SGD, Adam


def make_params(dtype=numpy.float64):
    rng = numpy.random.default_rng(0)
    return {"layer0.w": rng.normal(size=(3, 2)).astype(dtype), "layer0.b": rng.normal(size=(2,)).astype(dtype)}


def make_grads(step, dtype=numpy.float64):
    rng = numpy.random.default_rng([1, step])
    return {"layer0.w": rng.normal(size=(3, 2)).astype(dtype), "layer0.b": rng.normal(size=(2,)).astype(dtype)}


def test_sgd_matches_hand_written_update():
    params = make_params()
    opt = SGD(lr=0.1)
    state = opt.init(params)
    expected = {k: v.copy() for k, v in params.items()}
    for step in range(3):
        grads = make_grads(step)
        params, state = opt.update(params, grads, state)
        for k in expected:
            expected[k] = expected[k] - 0.1 * grads[k]
        for k in expected:
            numpy.testing.assert_allclose(params[k], expected[k], rtol=0, atol=1e-15)
    assert int(state["step"]) == 3


def test_adam_matches_hand_written_update():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    params = make_params()
    opt = Adam(lr=lr, b1=b1, b2=b2, eps=eps)
    state = opt.init(params)
    assert sorted(state) == ["m/layer0.b", "m/layer0.w", "step", "v/layer0.b", "v/layer0.w"]
    w = params["layer0.w"].copy()
    m = numpy.zeros_like(w)
    v = numpy.zeros_like(w)
    for t in (1, 2, 3, 4):
        grads = make_grads(t)
        params, state = opt.update(params, grads, state)
        g = grads["layer0.w"]
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        w = w - lr * m_hat / (numpy.sqrt(v_hat) + eps)
        numpy.testing.assert_allclose(params["layer0.w"], w, rtol=1e-13, atol=1e-15)
        numpy.testing.assert_allclose(state["m/layer0.w"], m, rtol=1e-13, atol=1e-15)
        numpy.testing.assert_allclose(state["v/layer0.w"], v, rtol=1e-13, atol=1e-15)
        assert int(state["step"]) == t


def test_adam_first_step_moves_each_entry_by_about_lr():
    # With bias correction, the first step is lr * g / (|g| + eps) = lr * sign(g).
    params = make_params()
    grads = make_grads(0)
    new, _ = Adam(lr=1e-3).update(params, grads, Adam(lr=1e-3).init(params))
    for k in params:
        numpy.testing.assert_allclose(params[k] - new[k], 1e-3 * numpy.sign(grads[k]), rtol=1e-6)


@pytest.mark.parametrize("opt", [SGD(0.1), Adam(0.1)])
def test_update_does_not_mutate_inputs(opt):
    params = make_params()
    grads = make_grads(0)
    state = opt.init(params)
    copies = [{k: v.copy() for k, v in d.items()} for d in (params, grads, state)]
    new_params, new_state = opt.update(params, grads, state)
    for original, copy in zip((params, grads, state), copies):
        assert original.keys() == copy.keys()
        for k in original:
            numpy.testing.assert_array_equal(original[k], copy[k])
    assert all(new_params[k] is not params[k] for k in params)
    assert new_state is not state


@pytest.mark.parametrize("opt", [SGD(0.1), Adam(0.1)])
def test_float32_stays_float32(opt):
    """float32 parameters stay float32 under float64 gradients (the gradients are cast, not the
    parameters), and follow the float64 run from the same start to float32 precision."""
    params = make_params(numpy.float32)
    reference = {k: p.astype(numpy.float64) for k, p in params.items()}
    state, reference_state = opt.init(params), opt.init(reference)
    for step in range(3):
        params, state = opt.update(params, make_grads(step, numpy.float64), state)
        reference, reference_state = opt.update(reference, make_grads(step, numpy.float64), reference_state)
    assert all(p.dtype == numpy.float32 for p in params.values())
    assert all(s.dtype == numpy.float32 for k, s in state.items() if k != "step")
    for k in params:
        numpy.testing.assert_allclose(params[k], reference[k], rtol=1e-6, atol=1e-6)
        assert not numpy.allclose(params[k], make_params()[k], atol=1e-2)  # the parameters did move


def test_clip_value_clips_each_entry():
    params = {"w": numpy.zeros(4)}
    grads = {"w": numpy.array([-50.0, -3.0, 2.0, 40.0])}
    new, _ = SGD(lr=1.0, clip_value=10.0).update(params, grads, {"step": numpy.asarray(0)})
    numpy.testing.assert_array_equal(new["w"], [10.0, 3.0, -2.0, -10.0])
    # Adam clips before the moments: a clipped gradient gives the same moments as the clipped values.
    adam = Adam(lr=0.1, clip_value=10.0)
    _, state = adam.update(params, grads, adam.init(params))
    numpy.testing.assert_allclose(state["m/w"], 0.1 * numpy.array([-10.0, -3.0, 2.0, 10.0]))


@pytest.mark.parametrize("opt", [SGD(0.1), Adam(0.1)])
def test_grad_errors_name_the_key(opt):
    params = make_params()
    state = opt.init(params)
    grads = make_grads(0)
    with pytest.raises(KeyError, match="layer0.b"):
        opt.update(params, {"layer0.w": grads["layer0.w"]}, state)
    with pytest.raises(KeyError, match="layer9.w"):
        opt.update(params, {**grads, "layer9.w": grads["layer0.w"]}, state)
    with pytest.raises(ValueError, match=r"layer0.w.*\(2, 3\).*\(3, 2\)"):
        opt.update(params, {**grads, "layer0.w": grads["layer0.w"].T}, state)


def test_adam_state_for_other_params_is_an_error():
    opt = Adam()
    params = make_params()
    with pytest.raises(KeyError, match="m/'layer0.w'"):
        opt.update(params, make_grads(0), {"step": numpy.asarray(0)})


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(lr=-1.0), dict(clip_value=0.0), dict(b1=1.0), dict(eps=0.0)])
def test_bad_hyperparameters_are_rejected(bad):
    with pytest.raises(ValueError):
        Adam(**bad)


@pytest.mark.skipif(not backend.gpu_available(), reason="needs CuPy and a GPU")
def test_adam_on_cupy_matches_numpy():
    import cupy

    params = make_params(numpy.float32)
    opt = Adam(lr=0.01, clip_value=1.0)
    state = opt.init(params)
    gpu_params = {k: cupy.asarray(v) for k, v in params.items()}
    gpu_state = opt.init(gpu_params)
    for step in range(3):
        grads = make_grads(step, numpy.float32)
        params, state = opt.update(params, grads, state)
        gpu_params, gpu_state = opt.update(gpu_params, {k: cupy.asarray(v) for k, v in grads.items()}, gpu_state)
    for k in params:
        assert isinstance(gpu_params[k], cupy.ndarray) and gpu_params[k].dtype == numpy.float32
        numpy.testing.assert_allclose(cupy.asnumpy(gpu_params[k]), params[k], rtol=1e-5, atol=1e-6)
