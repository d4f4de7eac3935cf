"""Array backend: NumPy on the CPU, CuPy on an NVIDIA GPU.

This is the only module that imports CuPy. Everything else asks it for the array namespace ``xp``
(``numpy`` or ``cupy``) and writes ``xp.exp(...)``, ``xp.matmul(...)``, so the same code runs on both.

- ``array_namespace(a)``: the namespace an array belongs to.
- ``get_device()`` / ``set_device("cpu" | "gpu")``: the process-wide default device, first read from the
  environment variable ``MINIMAML_DEVICE`` (default ``cpu``). ``"strict"`` is for the tests: their
  stand-in for CuPy (``tests/strict_xp.py``) plays CuPy, and the device is ``"gpu"``.
- ``xp()``: the namespace of the default device.
- ``rng(seed)``: a seeded generator on the default device; ``to_numpy(a)``: a host copy.
- ``scatter_add(out, index, values)``: ``out[index] += values`` with repeated indices summed.
- ``synchronize()``: wait until the GPU has finished the work queued so far (timing; no-op on the CPU).
"""

from __future__ import annotations

import os
import sys

import numpy

DEVICES = ("cpu", "gpu", "strict")

_cupy = None  # the cupy module once it has been imported successfully
_device = None  # the default device, read lazily from MINIMAML_DEVICE


class BackendError(RuntimeError):
    """The requested device cannot be used (CuPy or a GPU is missing, or a bad device name)."""


def _import_cupy():
    """Import CuPy and check that it sees a GPU; raise a BackendError that says what is missing."""
    global _cupy
    if _cupy is not None:
        return _cupy
    try:
        import cupy
    except ImportError as err:
        raise BackendError(
            "device 'gpu' needs CuPy, which is not installed: install it with "
            "`pip install -e '.[gpu]'` (or `pip install cupy-cuda12x` for your CUDA version)"
        ) from err
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDA driver missing or broken
        raise BackendError(f"device 'gpu': CuPy is installed but no CUDA GPU is usable ({err})") from err
    if count < 1:
        raise BackendError("device 'gpu': CuPy is installed but no CUDA GPU was found")
    _cupy = cupy
    return cupy


def _import_strict_stand_in():
    """The tests' stand-in for ``cupy`` and ``cupyx``, which NumPy backs (``tests/strict_xp.py``)."""
    try:
        import strict_xp
    except ImportError as err:
        raise BackendError("device 'strict' is the tests' stand-in for CuPy (tests/strict_xp.py): run it "
                           "with tests/ on PYTHONPATH") from err
    sys.modules["cupyx"] = strict_xp.cupyx
    return strict_xp


def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one GPU."""
    try:
        _import_cupy()
    except BackendError:
        return False
    return True


def set_device(device: str) -> None:
    """Set the process-wide default device: ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy); ``"strict"``: the
    GPU path on the tests' stand-in for CuPy."""
    global _device, _cupy
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}: expected one of {DEVICES}")
    if device == "strict":
        _cupy, device = _import_strict_stand_in(), "gpu"
    if device == "gpu":
        _import_cupy()
    _device = device


def get_device() -> str:
    """The default device; on first use read from ``MINIMAML_DEVICE`` (``cpu`` when unset)."""
    if _device is None:
        set_device(os.environ.get("MINIMAML_DEVICE", "cpu").strip().lower() or "cpu")
    return _device


def xp():
    """The array namespace (``numpy`` or ``cupy``) of the default device."""
    return numpy if get_device() == "cpu" else _import_cupy()


def array_namespace(array):
    """The namespace an array lives in: ``numpy`` for NumPy arrays and scalars, ``cupy`` for CuPy arrays."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy
    return numpy


def gpu_in_use() -> bool:
    """True once CuPy has been imported here (until then every array is a NumPy array)."""
    return _cupy is not None


def same_device(a, b) -> bool:
    """Whether two arrays can meet in one operation: both NumPy, both CuPy, or one a NumPy scalar
    (a Python number's stand-in, which CuPy accepts)."""
    if isinstance(a, numpy.generic) or isinstance(b, numpy.generic):
        return True
    return is_gpu_array(a) == is_gpu_array(b)


def is_gpu_array(array) -> bool:
    return _cupy is not None and isinstance(array, _cupy.ndarray)


def asarray(data, dtype=None):
    """``data`` as an array on the default device (a host array is copied to the GPU when needed)."""
    return xp().asarray(data, dtype=dtype)


def to_numpy(array) -> numpy.ndarray:
    """A NumPy (host) copy of ``array``; NumPy arrays are returned as they are."""
    if is_gpu_array(array):
        return _cupy.asnumpy(array)
    return numpy.asarray(array)


def rng(seed):
    """A seeded random generator on the default device (``numpy.random.Generator`` or CuPy's)."""
    if get_device() == "cpu":
        return numpy.random.default_rng(seed)
    return _import_cupy().random.default_rng(seed)


def scatter_add(out, index, values) -> None:
    """In place: ``out[index] += values``, summing over repeated entries of an integer ``index``."""
    if is_gpu_array(out):
        import cupyx

        cupyx.scatter_add(out, index, values)
    else:
        numpy.add.at(out, index, values)


def synchronize() -> None:
    """Wait for the work queued on the current GPU stream to finish (CuPy returns from a call once its
    kernels are queued, so a timer must wait for them). Nothing to wait for on the CPU."""
    if _cupy is not None:
        _cupy.cuda.get_current_stream().synchronize()
