"""A strict stand-in for CuPy, for the tests only: the GPU path of minimaml, checked without a GPU.

``MINIMAML_DEVICE=strict`` (or ``backend.set_device("strict")``), with ``tests/`` on the import path,
makes ``minimaml.backend`` take this module for ``cupy`` (and ``cupyx``); the default device is then
``"gpu"``, so every branch written for CuPy runs. NumPy does the arithmetic underneath; what this module
adds is CuPy's refusals, and a count of the host transfers:

- its arrays (``ndarray``) are not NumPy arrays; ``numpy.asarray(a)`` raises TypeError, as CuPy's
  ``__array__`` does, and so does any NumPy function or ufunc given one;
- an operation mixing one with a NumPy array raises TypeError (NumPy and Python scalars are allowed,
  as in CuPy); only ``asarray`` / ``array``, an index and a value assigned into an array take host arrays;
- every explicit device-to-host transfer, each a GPU stall (``asnumpy``, which ``backend.to_numpy``
  calls; ``float``, ``int``, ``bool``, ``.item()``, ``.tolist()``, ``.get()``, formatting; ``synchronize``), is
  counted in ``transfers`` by kind and by the line of minimaml that asked for it.

It is stricter than CuPy in one way: CuPy lets ``numpy.sum(cupy_array)`` through (``__array_function__``);
here that raises, since minimaml takes every function from ``xp``. It exposes all of NumPy's namespace,
where CuPy lacks some functions: a NumPy-only function is not caught (docs/autodiff.md, "The GPU path").
"""

from __future__ import annotations

import collections
import os
import sys
import types

import numpy

transfers = collections.Counter()  # (kind, "path:line") -> count of device-to-host transfers
_FORWARDERS = ("strict_xp.py", os.path.join("minimaml", "backend.py"),
               os.path.join("minimaml", "autodiff", "tensor.py"))  # their callers are the ones asking
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the repository
_HOST_INPUT = frozenset({"asarray", "array", "asanyarray", "ascontiguousarray"})  # CuPy uploads these


def reset() -> None:
    transfers.clear()


def count() -> int:
    """The device-to-host transfers (and synchronisations) since the last ``reset``."""
    return sum(transfers.values())


def _asking_line() -> str:
    """``path:line`` (from the repository's root) of the innermost frame outside this module, the backend
    and the tape's Tensor."""
    frame = sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.endswith(_FORWARDERS):
        frame = frame.f_back
    path = os.path.abspath(frame.f_code.co_filename)
    return f"{os.path.relpath(path, _ROOT) if path.startswith(_ROOT) else path}:{frame.f_lineno}"


def _transfer(kind: str) -> None:
    transfers[kind, _asking_line()] += 1


def _device(value, host_ok: bool = False):
    """``value`` for NumPy: a stand-in array unwrapped, lists and tuples item by item; a NumPy array
    raises TypeError unless ``host_ok`` (CuPy: "Unsupported type <class 'numpy.ndarray'>")."""
    if isinstance(value, ndarray):
        return value._data
    if isinstance(value, numpy.ndarray) and not host_ok:
        raise TypeError(f"a NumPy array (shape {value.shape}, {value.dtype}) met a device array: move it "
                        f"with minimaml.backend.asarray first (CuPy raises TypeError here too)")
    if isinstance(value, (list, tuple)):
        return type(value)(_device(v, host_ok) for v in value)
    return value


def _wrapped(result):
    """NumPy's result as CuPy's: arrays and NumPy scalars (reductions) become stand-in arrays."""
    if isinstance(result, (numpy.ndarray, numpy.generic)):
        return ndarray(numpy.asarray(result))
    if isinstance(result, tuple):
        return tuple(_wrapped(r) for r in result)
    return result


def _on_device(function, host_ok: bool = False):
    def call(*args, **kwargs):
        return _wrapped(function(*_device(args, host_ok), **{k: _device(v, host_ok) for k, v in kwargs.items()}))
    call.__name__ = getattr(function, "__name__", "function")
    return call


class ndarray:
    """A device array: a NumPy array kept out of NumPy's reach."""

    __array_ufunc__ = None  # NumPy ufuncs, and operators with a NumPy array on the left, defer here
    __hash__ = None

    def __init__(self, data: numpy.ndarray):
        self._data = data

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (as in CuPy): use "
                        "minimaml.backend.to_numpy")

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} was given a device array: take the function from the "
                        f"array's namespace (minimaml.backend.array_namespace)")

    def __getattr__(self, name):  # shape, dtype, ndim, size, T, ...; astype, reshape, sum, ...
        if name.startswith("_"):  # no __array_interface__, buffer or other way round __array__
            raise AttributeError(name)
        value = getattr(self._data, name)
        return _on_device(value) if callable(value) else _wrapped(value)

    def __getitem__(self, index):
        return _wrapped(self._data[_device(index, host_ok=True)])

    def __setitem__(self, index, value):
        self._data[_device(index, host_ok=True)] = _device(value, host_ok=True)

    def __len__(self):
        return len(self._data)

    def __iter__(self):
        return (_wrapped(row) for row in self._data)

    def __repr__(self):
        return f"strict_xp.ndarray({self._data!r})"

    # The explicit host transfers, each counted.
    def get(self) -> numpy.ndarray:
        _transfer("get")
        return self._data.copy()

    def item(self):
        _transfer("item")
        return self._data.item()

    def tolist(self):
        _transfer("tolist")
        return self._data.tolist()

    def __float__(self):
        _transfer("float")
        return float(self._data)

    def __int__(self):
        _transfer("int")
        return int(self._data)

    def __bool__(self):
        _transfer("bool")
        return bool(self._data)

    def __format__(self, spec):  # f"{loss:.3f}" of a device scalar: CuPy copies it to the host
        _transfer("format")
        return format(self._data, spec)


def _operator(name: str):
    def method(self, *other):
        return _wrapped(getattr(self._data, name)(*_device(other)))
    return method


def _in_place(name: str):
    def method(self, other):
        result = getattr(self._data, name)(_device(other))  # in place on the NumPy array underneath
        return NotImplemented if result is NotImplemented else self
    return method


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor"):
    setattr(ndarray, f"__{_op}__", _operator(f"__{_op}__"))
    setattr(ndarray, f"__r{_op}__", _operator(f"__r{_op}__"))
    setattr(ndarray, f"__i{_op}__", _in_place(f"__i{_op}__"))
for _op in ("lt", "le", "gt", "ge", "eq", "ne", "neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_op}__", _operator(f"__{_op}__"))


def asnumpy(array) -> numpy.ndarray:
    """CuPy's ``asnumpy``: the one door from the device to the host (``backend.to_numpy``)."""
    _transfer("asnumpy")
    return array._data.copy() if isinstance(array, ndarray) else numpy.asarray(array)


def __getattr__(name):
    """The rest of the namespace is NumPy's: functions run on the device arrays (NumPy arrays refused,
    but by ``asarray`` and ``array``); types (dtypes, ``finfo``) and constants are NumPy's own."""
    value = getattr(numpy, name)
    if isinstance(value, types.ModuleType):
        return types.SimpleNamespace(**{k: _on_device(v) if callable(v) and not isinstance(v, type) else v
                                        for k, v in vars(value).items() if not k.startswith("_")})
    if callable(value) and not isinstance(value, type):
        return _on_device(value, host_ok=name in _HOST_INPUT)
    return value


class Generator:
    """CuPy's ``random.Generator``: only the methods CuPy has (no ``normal``, ``choice``, ``permutation``,
    ``shuffle``), each returning a device array."""

    _METHODS = frozenset({"random", "uniform", "integers", "standard_normal", "standard_exponential",
                          "exponential", "standard_gamma", "gamma", "beta", "binomial", "poisson"})

    def __init__(self, seed):
        self._numpy = numpy.random.default_rng(seed)

    def __getattr__(self, name):
        if name not in self._METHODS:
            raise AttributeError(f"cupy.random.Generator has no method {name!r}")
        return _on_device(getattr(self._numpy, name))


random = types.SimpleNamespace(default_rng=Generator, Generator=Generator)


class _Stream:
    def synchronize(self) -> None:
        _transfer("synchronize")


cuda = types.SimpleNamespace(get_current_stream=_Stream)
cupyx = types.ModuleType("cupyx")  # backend.scatter_add: cupyx.scatter_add(out, index, values)
cupyx.scatter_add = lambda out, index, values: numpy.add.at(out._data, _device(index, host_ok=True),
                                                            _device(values))
