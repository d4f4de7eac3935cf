"""Shared fixtures and hypothesis strategies for the autodiff tape's tests.

- ``gpu`` (marker and fixture): a test marked ``@pytest.mark.gpu`` or asking for the ``gpu`` fixture is
  skipped cleanly when ``minimaml.backend.gpu_available()`` is False; the fixture switches the default
  device to ``"gpu"`` for the test, hands it the ``cupy`` module, and switches back afterwards.
- ``float_arrays``, ``away_from_zero``, ``distinct_arrays``, ``positive_arrays``: float64 arrays
  (hypothesis-drawn shapes and values), built to stay away from the kinks of relu/abs/max/maximum and
  from the poles of log/sqrt/divide, so finite differences are meaningful.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minimaml import backend

# --- the GPU marker and fixture ----------------------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CuPy and a CUDA GPU; skipped where there is none")


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    if marked and not backend.gpu_available():
        skip = pytest.mark.skip(reason="no GPU: CuPy is not installed or sees no CUDA device")
        for item in marked:
            item.add_marker(skip)


@pytest.fixture
def gpu():
    """The ``cupy`` module, with the default device set to ``"gpu"`` for the test (skips without a GPU)."""
    if not backend.gpu_available():
        pytest.skip("no GPU: CuPy is not installed or sees no CUDA device")
    previous = backend.get_device()
    backend.set_device("gpu")
    try:
        yield backend._import_cupy()
    finally:
        backend.set_device(previous)


@pytest.fixture
def restore_device():
    """Put the process-wide default device back after a test that changes it."""
    previous = backend._device
    yield
    backend._device = previous


# --- strategies ----------------------------------------------------------------------------------------

# Small shapes keep every check fast; a side of 1 is allowed so broadcasting gets exercised.
def shapes(min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 4):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def float_arrays(shape, lo: float = -2.0, hi: float = 2.0):
    """float64 arrays of ``shape`` (a tuple or a strategy) with entries in [lo, hi]."""
    elements = st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=64)
    return hnp.arrays(np.float64, shape, elements=elements)


def positive_arrays(shape, lo: float = 0.3, hi: float = 3.0):
    """Entries in [lo, hi] with lo > 0: log, sqrt, division and non-integer powers are smooth there."""
    return float_arrays(shape, lo, hi)


def _push_from_zero(a: np.ndarray, margin: float) -> np.ndarray:
    sign = np.where(a >= 0, 1.0, -1.0)
    return sign * (margin + np.abs(a))


def away_from_zero(shape, margin: float = 0.25, hi: float = 2.0):
    """Entries with |x| in [margin, margin + hi]: no entry sits at the kink of relu or abs (or a pole of
    1/x); finite-difference steps (~1e-3 at most) never cross zero."""
    return float_arrays(shape, -hi, hi).map(lambda a: _push_from_zero(a, margin))


@st.composite
def distinct_arrays(draw, shape, gap: float = 0.2):
    """Entries that are a hypothesis-drawn permutation of an evenly spaced grid (spacing ``gap``) plus a
    common offset: no two entries are closer than ``gap``, so max has no ties anywhere."""
    if not isinstance(shape, tuple):
        shape = draw(shape)
    n = int(np.prod(shape, dtype=np.int64))
    perm = draw(st.permutations(list(range(n))))
    offset = draw(st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False))
    values = (np.asarray(perm, dtype=np.float64) - n / 2) * gap + offset
    return values.reshape(shape)


def seeds():
    return st.integers(0, 2**32 - 1)


def lattice_arrays(shape, offset: float = 0.0, spacing: float = 0.5, half_width: int = 4):
    """Entries ``offset + k * spacing`` with integer k in [-half_width, half_width]. Two arrays on
    lattices shifted by half a spacing (offsets 0 and spacing / 2) never come closer than spacing / 2,
    so ``maximum(a, b)`` has no ties (its kink) whatever the broadcasting."""
    return hnp.arrays(np.int64, shape, elements=st.integers(-half_width, half_width)).map(
        lambda k: offset + spacing * k.astype(np.float64))


@st.composite
def axes_for(draw, ndim: int):
    """An ``axis`` argument for a reduction over an array of ``ndim`` dimensions: None, an int (possibly
    negative) or a tuple of distinct ints (possibly negative, possibly empty)."""
    kind = draw(st.sampled_from(["none", "int", "tuple"] if ndim else ["none", "tuple"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    if ndim == 0:
        return ()
    axes = draw(st.lists(st.integers(0, ndim - 1), unique=True, max_size=ndim))
    signs = draw(st.lists(st.booleans(), min_size=len(axes), max_size=len(axes)))
    return tuple(a - ndim if neg else a for a, neg in zip(axes, signs))


# --- gradient checks -----------------------------------------------------------------------------------

RTOL = 1e-6  # the acceptance bound on the relative error of every derivative


def assert_grads(f, inputs, order: int = 2, rtol: float = RTOL, **kwargs):
    """``check_grads`` at first ... ``order``-th order (raises GradCheckError on failure); returns the
    report after checking that it covers every order and every input."""
    from minimaml.autodiff import check_grads

    report = check_grads(f, list(inputs), order=order, rtol=rtol, **kwargs)
    assert report.ok, str(report)
    assert len(report.checks) == order * len(inputs)
    return report


def fast(max_examples: int = 25):
    """Hypothesis settings for these tests: few examples (each is a full multi-order check), no deadline
    (the first call of a test pays import and warm-up costs)."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- dtype and device helpers shared by the op tables ---------------------------------------------------


def assert_dtype_preserved(f, arrays, dtype):
    """``f`` on ``arrays`` cast to ``dtype``: the output, its gradients (recorded) and the gradients of
    those gradients all keep ``dtype``: nothing is silently upcast (or downcast) on the way."""
    from minimaml import autodiff as ad

    leaves = [ad.Tensor(np.asarray(a).astype(dtype), requires_grad=True) for a in arrays]
    out = f(*leaves)
    assert out.dtype == dtype, f"forward: {out.dtype} != {dtype}"
    scalar = ad.sum(out * out)
    assert scalar.dtype == dtype
    grads = ad.grad(scalar, leaves, create_graph=True)
    for i, g in enumerate(grads):
        assert g.dtype == dtype, f"gradient {i}: {g.dtype} != {dtype}"
        assert g.shape == leaves[i].shape
    second = ad.sum(grads[0] * grads[0])
    for g in grads[1:]:
        second = second + ad.sum(g * g)
    for i, h in enumerate(ad.grad(second, leaves)):
        assert h.dtype == dtype, f"second-order gradient {i}: {h.dtype} != {dtype}"
        assert h.shape == leaves[i].shape


def to_gpu_and_check(cupy, f, arrays, order: int = 2):
    """The same gradient check as on the CPU, with every input a CuPy array."""
    from minimaml import backend
    from minimaml.autodiff import Tensor

    gpu_arrays = [cupy.asarray(a) for a in arrays]
    out = f(*[Tensor(a) for a in gpu_arrays])
    assert backend.is_gpu_array(out.data), "the result of an op on CuPy arrays is not a CuPy array"
    return assert_grads(f, gpu_arrays, order=order)


def ten_second_steps(monkeypatch, module, step_makers, stop_at=None):
    """Fake the training clock of an experiment ``module``: every step that its functions named in
    ``step_makers`` (e.g. ``"meta_step"``) build takes 10 s by ``train``'s clock; ``stop_at[0]``: the
    iteration that raises KeyboardInterrupt (None: none does)."""
    from minimaml import train
    clock = [0.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])

    class TenSeconds(train.Step):
        def __init__(self, step):
            self.step = step

        def init(self, params):
            return self.step.init(params)

        def __call__(self, params, state, rng, iteration):
            if stop_at is not None and iteration == stop_at[0]:
                raise KeyboardInterrupt
            clock[0] += 10.0
            return self.step(params, state, rng, iteration)

    for name in step_makers:
        make = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, make=make: TenSeconds(make(*args)))
