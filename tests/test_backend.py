"""``minimaml.backend``: device selection and its errors, the helpers, and (only where a GPU exists) the
tape on CuPy arrays: gradient checks, dtypes, and clear errors when NumPy and CuPy arrays are mixed."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from conftest import assert_grads
from minimaml import autodiff as ad
from minimaml import backend
from minimaml.autodiff import Tensor
from minimaml.backend import BackendError


def hide_cupy(monkeypatch):
    """Make ``import cupy`` fail, as on a machine without CuPy (also on machines that have it)."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(backend, "_cupy", None)


# --- device selection --------------------------------------------------------------------------------------


def test_gpu_available_is_a_bool():
    assert isinstance(backend.gpu_available(), bool)


def test_set_device_gpu_without_cupy_says_what_is_missing_and_how_to_install(monkeypatch, restore_device):
    hide_cupy(monkeypatch)
    backend.set_device("cpu")
    with pytest.raises(BackendError) as err:
        backend.set_device("gpu")
    message = str(err.value)
    assert "CuPy" in message and "not installed" in message and "pip install" in message
    assert "[gpu]" in message or "cupy-cuda" in message
    assert backend.get_device() == "cpu"  # a failed switch leaves the device as it was
    assert backend.gpu_available() is False


def test_no_gpu_here_means_set_device_gpu_raises():
    if backend.gpu_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError, match="gpu"):
        backend.set_device("gpu")


@pytest.mark.parametrize("name", ["tpu", "cuda", "GPU", "", "cpu:0"])
def test_bad_device_name(name, restore_device):
    with pytest.raises(BackendError) as err:
        backend.set_device(name)
    assert repr(name) in str(err.value) and "cpu" in str(err.value) and "gpu" in str(err.value)


def test_backend_error_is_a_runtime_error():
    assert issubclass(BackendError, RuntimeError)


@pytest.mark.parametrize("value", ["cpu", " CPU ", ""])
def test_device_from_environment(value, monkeypatch, restore_device):
    monkeypatch.setenv("MINIMAML_DEVICE", value)
    monkeypatch.setattr(backend, "_device", None)
    assert backend.get_device() == "cpu"
    assert backend.xp() is np


def test_default_device_without_environment(monkeypatch, restore_device):
    monkeypatch.delenv("MINIMAML_DEVICE", raising=False)
    monkeypatch.setattr(backend, "_device", None)
    assert backend.get_device() == "cpu"


def test_bad_device_from_environment(monkeypatch, restore_device):
    monkeypatch.setenv("MINIMAML_DEVICE", "quantum")
    monkeypatch.setattr(backend, "_device", None)
    with pytest.raises(BackendError, match="quantum"):
        backend.get_device()


def test_gpu_from_environment_without_cupy(monkeypatch, restore_device):
    hide_cupy(monkeypatch)
    monkeypatch.setenv("MINIMAML_DEVICE", "gpu")
    monkeypatch.setattr(backend, "_device", None)
    with pytest.raises(BackendError, match="CuPy"):
        backend.get_device()


# --- helpers on the CPU ---------------------------------------------------------------------------------------


def test_cpu_helpers(restore_device):
    backend.set_device("cpu")
    a = backend.asarray([1.0, 2.0], dtype=np.float32)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32
    assert backend.array_namespace(a) is np and backend.array_namespace(np.float64(1.0)) is np
    assert not backend.is_gpu_array(a)
    assert backend.to_numpy(a) is a
    np.testing.assert_array_equal(backend.rng(3).standard_normal(4), np.random.default_rng(3).standard_normal(4))
    out = np.zeros(3)
    backend.scatter_add(out, np.array([0, 2, 0, 0]), np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(out, [8.0, 0.0, 2.0])
    backend.synchronize()  # nothing queued on the CPU: returns at once


class DeviceArray(np.ndarray):
    """The array type of a stand-in "GPU" namespace: NumPy arrays that remember where they were made."""


def test_tensor_from_python_data_lives_on_the_default_device(monkeypatch, restore_device):
    """Python data becomes an array of the default device's namespace, holding the same values. With a
    stand-in CuPy (its ``asarray`` makes ``DeviceArray``s) as the default, a Tensor's data is made there;
    back on the CPU it is a plain NumPy array again."""
    stand_in = types.SimpleNamespace(ndarray=DeviceArray,
                                     asarray=lambda data, dtype=None: np.asarray(data, dtype).view(DeviceArray))
    monkeypatch.setattr(backend, "_cupy", stand_in)
    backend.set_device("gpu")
    on_gpu = Tensor([1.0, 2.0])
    assert type(on_gpu.data) is DeviceArray and backend.array_namespace(on_gpu.data) is stand_in
    backend.set_device("cpu")
    on_cpu = Tensor([[1.0, 2.0], [3.0, 4.0]])
    assert type(on_cpu.data) is np.ndarray and backend.array_namespace(on_cpu.data) is np
    np.testing.assert_array_equal(on_gpu.data, [1.0, 2.0])
    np.testing.assert_array_equal(on_cpu.data, [[1.0, 2.0], [3.0, 4.0]])
    assert on_gpu.dtype == np.float64 and on_cpu.dtype == np.float64


# --- the GPU (skipped cleanly where there is none) -------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_device_and_helpers(gpu):
    assert backend.get_device() == "gpu" and backend.xp() is gpu
    a = backend.asarray(np.array([1.0, 2.0], np.float32))
    assert isinstance(a, gpu.ndarray) and a.dtype == np.float32
    assert backend.is_gpu_array(a) and backend.array_namespace(a) is gpu
    host = backend.to_numpy(a)
    assert isinstance(host, np.ndarray) and np.array_equal(host, [1.0, 2.0])
    assert isinstance(Tensor([1.0]).data, gpu.ndarray)
    r1, r2 = backend.rng(5).standard_normal(3), backend.rng(5).standard_normal(3)
    assert isinstance(r1, gpu.ndarray) and bool((r1 == r2).all())
    big = gpu.ones((2048, 2048), dtype=np.float32)
    product = big @ big  # queued; synchronize waits until it is done
    backend.synchronize()
    assert gpu.cuda.get_current_stream().done and float(product[0, 0]) == 2048.0
    out = gpu.zeros(3)
    backend.scatter_add(out, gpu.asarray([0, 2, 0, 0]), gpu.asarray([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(backend.to_numpy(out), [8.0, 0.0, 2.0])


@pytest.mark.gpu
def test_gpu_from_environment(gpu, monkeypatch, restore_device):
    monkeypatch.setenv("MINIMAML_DEVICE", "gpu")
    monkeypatch.setattr(backend, "_device", None)
    assert backend.get_device() == "gpu"


MIXED_OPS = {
    "add": lambda a, b: ad.add(a, b),
    "multiply": lambda a, b: a * b,
    "where": lambda a, b: ad.where(np.ones((3, 3), bool), a, b),
    "matmul": lambda a, b: a @ b,
    "conv2d": lambda a, b: ad.conv2d(ad.reshape(a, (3, 3, 1)), ad.reshape(b, (3, 3, 1, 1))),
    "mse": lambda a, b: ad.mse(a, b),
    "concatenate": lambda a, b: ad.concatenate([a, b]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MIXED_OPS))
@pytest.mark.parametrize("gpu_first", [True, False])
def test_mixing_numpy_and_cupy_arrays_raises_a_clear_error(gpu, name, gpu_first):
    host = Tensor(np.ones((3, 3)), requires_grad=True)
    device = Tensor(gpu.ones((3, 3)), requires_grad=True)
    a, b = (device, host) if gpu_first else (host, device)
    with pytest.raises(TypeError) as err:
        MIXED_OPS[name](a, b)
    message = str(err.value)
    assert message.startswith(name) and "device" in message


@pytest.mark.gpu
def test_gpu_gradient_checks_first_and_second_order(gpu):
    rng = np.random.default_rng(0)
    x = gpu.asarray(rng.standard_normal((2, 5, 5, 2)))
    w = gpu.asarray(rng.standard_normal((3, 3, 2, 3)))
    assert_grads(lambda a, b: ad.max_pool2x2(ad.tanh(ad.conv2d(a, b, 2, "SAME"))), [x, w])
    logits = gpu.asarray(rng.standard_normal((2, 4, 3)))
    labels = gpu.asarray(rng.integers(0, 3, (2, 4)))
    assert_grads(lambda z: ad.softmax_cross_entropy(z, labels), [logits])
    m = gpu.asarray(rng.standard_normal((4, 3)))
    mask = gpu.asarray(np.array([True, False, True, True]))
    assert_grads(lambda t: t[mask] ** 2 + ad.sum(t[gpu.asarray([0, 0, 3])]), [m])


@pytest.mark.gpu
def test_gpu_third_order_and_hvp(gpu):
    rng = np.random.default_rng(1)
    a = gpu.asarray(rng.standard_normal((3, 2)))
    b = gpu.asarray(rng.standard_normal((2, 2)))
    assert_grads(lambda x, y: ad.sigmoid(x @ y) * ad.exp(x[:, :1]), [a, b], order=3)
    hv = ad.hvp(lambda x: ad.sum(x ** 3), [a], [gpu.ones_like(a)])
    assert backend.is_gpu_array(hv[0])
    np.testing.assert_allclose(backend.to_numpy(hv[0]), 6 * backend.to_numpy(a), rtol=1e-12)


@pytest.mark.gpu
def test_gpu_float32_stays_float32_and_unused_inputs_get_gpu_zeros(gpu):
    x = Tensor(gpu.ones((2, 3), dtype=gpu.float32), requires_grad=True)
    z = Tensor(gpu.ones(4, dtype=gpu.float32), requires_grad=True)
    out = ad.sum(ad.log_softmax(ad.tanh(x * 2.0)) ** 2)
    gx, gz = ad.grad(out, [x, z])
    assert out.dtype == np.float32 and gx.dtype == np.float32 and gz.dtype == np.float32
    assert backend.is_gpu_array(gx.data) and backend.is_gpu_array(gz.data)
    assert float(gz.data.sum()) == 0.0
