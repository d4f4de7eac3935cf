"""``check_grads`` itself: it passes correct rules, catches wrong ones (at the order where they go wrong, for
the input that is wrong), returns a printable report, and refuses inputs that are not float64."""

from __future__ import annotations

import numpy as np
import pytest

from minimaml import autodiff as ad
from minimaml.autodiff import GradCheckError, GradCheckReport, Tensor, check_grads
from minimaml.autodiff.tensor import record


def cube(x):
    """x^3 with a correct, differentiable VJP (written with tape operations)."""
    return record(x.data ** 3, (x,), lambda g: (g * 3.0 * x * x,))


def cube_wrong_factor(x):
    """x^3 with a wrong VJP: 2 x^2 instead of 3 x^2."""
    return record(x.data ** 3, (x,), lambda g: (g * 2.0 * x * x,))


def cube_frozen_vjp(x):
    """x^3 whose VJP is right in value but built from a raw array, so it is a constant on the tape:
    first derivatives are right, second derivatives come out 0 instead of 6 x."""
    return record(x.data ** 3, (x,), lambda g: (g * Tensor(3.0 * x.data ** 2),))


def mul_wrong_second(a, b):
    """a * b with a VJP wrong only for b."""
    return record(a.data * b.data, (a, b), lambda g: (g * b, g * a * 1.5))


def swap_wrong(x):
    """A vector-valued op (x0, x1) -> (x0, 2 x1) whose VJP forgets the factor 2 on the second output."""
    return record(x.data * np.array([1.0, 2.0]), (x,), lambda g: (g * 1.0,))


X = np.array([0.7, -1.3, 0.4])


def test_correct_custom_op_passes_and_returns_a_report():
    report = check_grads(cube, [X], order=3)
    assert isinstance(report, GradCheckReport) and report.ok
    assert [(c.order, c.input) for c in report.checks] == [(1, 0), (2, 0), (3, 0)]
    for k in (1, 2, 3):
        assert report.max_rel_error(k) <= 1e-6
    assert np.isnan(report.max_rel_error(4))
    text = str(report)
    assert "order" in text and "FAIL" not in text and len(text.splitlines()) == 4
    for c in report.checks:
        assert c.ok and c.abs_error == abs(c.tape - c.finite_difference)


def test_wrong_vjp_raises_grad_check_error():
    with pytest.raises(GradCheckError) as err:
        check_grads(cube_wrong_factor, [X], order=1)
    assert "FAIL" in str(err.value)
    assert isinstance(err.value, AssertionError)  # so a bare check_grads(...) in a test fails the test


def test_report_without_raising():
    report = check_grads(cube_wrong_factor, [X], order=2, raise_on_failure=False)
    assert not report.ok
    first = [c for c in report.checks if c.order == 1]
    assert len(first) == 1 and not first[0].ok
    # the tape says 2/3 of the truth
    assert first[0].tape == pytest.approx(2 / 3 * first[0].finite_difference, rel=1e-6)
    assert "FAIL" in str(report)


def test_a_vjp_that_is_not_differentiable_fails_at_second_order_only():
    report = check_grads(cube_frozen_vjp, [X], order=1)
    assert report.ok
    with pytest.raises(GradCheckError):
        check_grads(cube_frozen_vjp, [X], order=2)
    report = check_grads(cube_frozen_vjp, [X], order=2, raise_on_failure=False)
    assert [c.ok for c in report.checks] == [True, False]


def test_the_wrong_input_is_named():
    report = check_grads(mul_wrong_second, [X, X[::-1].copy()], order=1, raise_on_failure=False)
    assert [(c.input, c.ok) for c in report.checks] == [(0, True), (1, False)]


def test_vector_valued_outputs_are_checked_through_their_vjp():
    with pytest.raises(GradCheckError):
        check_grads(swap_wrong, [np.array([0.5, -0.5])], order=1)


def test_third_order_of_a_composite_of_custom_and_library_ops():
    check_grads(lambda x, y: ad.tanh(cube(x) * y) + ad.sum(ad.exp(y)), [X, X * 0.5], order=3)


def test_tensor_inputs_are_accepted():
    assert check_grads(cube, [Tensor(X)], order=1).ok


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64])
def test_refuses_inputs_that_are_not_float64(dtype):
    with pytest.raises(TypeError, match="float64") as err:
        check_grads(lambda x: x * x, [X.astype(dtype)])
    assert "input 0" in str(err.value)
    # the second input too
    with pytest.raises(TypeError, match="input 1"):
        check_grads(lambda x, y: x * y, [X, X.astype(dtype)])


def test_zero_derivatives_pass():
    assert check_grads(lambda x: x * 0.0 + 1.0, [X], order=2).ok
    assert check_grads(lambda x: ad.sum(x), [np.zeros(3)], order=2).ok


def test_seeds_change_the_directions_but_not_the_verdict():
    r0 = check_grads(cube, [X], order=2, seed=0)
    r1 = check_grads(cube, [X], order=2, seed=1)
    assert r0.ok and r1.ok and r0.checks[0].tape != r1.checks[0].tape


@pytest.mark.parametrize("tiny", [1e-19, 1e-12, 1e-8])
def test_inputs_of_tiny_scale_get_a_usable_step(tiny):
    """A correct op must pass whatever the scale of its inputs. check_grads takes the step
    h = step * max|x| of each input, so for an input whose entries are all tiny but nonzero (a bias
    initialised at 1e-19, a gradient that has nearly vanished) h is ~1e-23 and the five-point
    difference is pure round-off: a correct ``a * b`` is reported as wrong (rel. error ~1). A floor on
    the scale, e.g. ``h = step * max(scale, 1.0)``, fixes it."""
    a = np.array([1.0, -0.5])
    b = np.array([tiny, 0.0])
    check_grads(ad.multiply, [a, b], order=2)
