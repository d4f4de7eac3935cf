"""Sinusoid tasks follow the paper (Finn, Abbeel & Levine 2017, Sec. 5.1): ranges, shapes, dtypes,
targets, seeded reproducibility."""

import math

import numpy
import pytest

from minimaml import backend
from minimaml.tasks import sinusoid
from minimaml.tasks.batch import Examples, TaskBatch


def arrays(batch: TaskBatch) -> list:
    """The four arrays of a task batch of ``Examples``: support x, y, then query x, y."""
    assert isinstance(batch, TaskBatch)
    assert isinstance(batch.support, Examples) and isinstance(batch.query, Examples)
    return [batch.support.x, batch.support.y, batch.query.x, batch.query.y]


def test_task_parameters_cover_their_ranges():
    amplitude, phase = sinusoid.sample_tasks(numpy.random.default_rng(0), 20000)
    assert amplitude.shape == phase.shape == (20000,)
    assert 0.1 <= amplitude.min() < 0.15 and 4.95 < amplitude.max() <= 5.0
    assert 0.0 <= phase.min() < 0.05 and math.pi - 0.05 < phase.max() <= math.pi
    assert abs(amplitude.mean() - 2.55) < 0.05 and abs(phase.mean() - math.pi / 2) < 0.05


def test_points_lie_on_their_task_curve():
    rng = numpy.random.default_rng(1)
    amplitude, phase = sinusoid.sample_tasks(rng, 50)
    x, y = sinusoid.sample_points(rng, amplitude, phase, k=400)
    assert x.shape == y.shape == (50, 400, 1) and x.dtype == numpy.float64
    assert -5.0 <= x.min() < -4.9 and 4.9 < x.max() <= 5.0
    numpy.testing.assert_allclose(y, amplitude[:, None, None] * numpy.sin(x - phase[:, None, None]))
    assert numpy.all(numpy.abs(y) <= amplitude[:, None, None] + 1e-12)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_batch_shapes_dtypes_and_device(dtype):
    batch = sinusoid.sample_batch(numpy.random.default_rng(2), meta_batch_size=25, k_shot=10, k_query=15,
                                  dtype=dtype)
    assert batch.n_tasks == 25
    assert [a.shape for a in arrays(batch)] == [(25, 10, 1), (25, 10, 1), (25, 15, 1), (25, 15, 1)]
    assert all(a.dtype == dtype for a in arrays(batch))
    assert all(backend.array_namespace(a) is backend.xp() for a in arrays(batch))
    support_x, support_y, query_x, query_y = (backend.to_numpy(a) for a in arrays(batch))
    assert not numpy.array_equal(support_x, query_x[:, :10])  # support and query are separate draws
    # Tasks are drawn first, so the same seed recovers (A, phase): query points lie on their curve.
    amplitude, phase = sinusoid.sample_tasks(numpy.random.default_rng(2), 25)
    numpy.testing.assert_allclose(query_y, sinusoid.true_function(query_x, amplitude[:, None, None],
                                                                   phase[:, None, None]), atol=1e-5)


def test_batch_query_defaults_to_k_shot_and_is_reproducible():
    a = sinusoid.sample_batch(numpy.random.default_rng(3), 4, k_shot=5)
    b = sinusoid.sample_batch(numpy.random.default_rng(3), 4, k_shot=5)
    c = sinusoid.sample_batch(numpy.random.default_rng(4), 4, k_shot=5)
    assert a.query.x.shape == (4, 5, 1)
    for u, v, w in zip(arrays(a), arrays(b), arrays(c)):
        assert numpy.array_equal(backend.to_numpy(u), backend.to_numpy(v))
        assert not numpy.array_equal(backend.to_numpy(u), backend.to_numpy(w))


def test_fixed_test_tasks_are_seeded_and_share_tasks_across_k():
    five = sinusoid.fixed_test_tasks(n_tasks=600, k_shot=5, seed=0)
    again = sinusoid.fixed_test_tasks(n_tasks=600, k_shot=5, seed=0)
    twenty = sinusoid.fixed_test_tasks(n_tasks=600, k_shot=20, seed=0)
    other = sinusoid.fixed_test_tasks(n_tasks=600, k_shot=5, seed=1)
    assert isinstance(five, sinusoid.SinusoidTestSet)
    for u, v in zip([five.amplitude, five.phase, *arrays(five.tasks)],
                    [again.amplitude, again.phase, *arrays(again.tasks)]):
        assert numpy.array_equal(backend.to_numpy(u), backend.to_numpy(v))
    numpy.testing.assert_array_equal(five.amplitude, twenty.amplitude)
    numpy.testing.assert_array_equal(five.phase, twenty.phase)
    assert not numpy.array_equal(five.amplitude, other.amplitude)
    assert five.amplitude.shape == five.phase.shape == (600,)
    assert five.tasks.n_tasks == 600
    assert five.tasks.support.x.shape == five.tasks.support.y.shape == (600, 5, 1)
    assert twenty.tasks.support.x.shape == (600, 20, 1)
    assert five.tasks.query.x.shape == five.tasks.query.y.shape == (600, 100, 1)
    assert all(a.dtype == numpy.float32 for a in arrays(five.tasks))
    numpy.testing.assert_array_equal(backend.to_numpy(five.tasks.query.x), backend.to_numpy(twenty.tasks.query.x))


def test_fixed_test_tasks_evaluate_on_a_dense_grid():
    test_set = sinusoid.fixed_test_tasks(n_tasks=3, k_shot=10, seed=0, n_eval=11)
    eval_x, eval_y = backend.to_numpy(test_set.tasks.query.x), backend.to_numpy(test_set.tasks.query.y)
    for task in range(3):
        numpy.testing.assert_allclose(eval_x[task, :, 0], numpy.linspace(-5, 5, 11), atol=1e-6)
        numpy.testing.assert_allclose(
            eval_y[task], sinusoid.true_function(eval_x[task], test_set.amplitude[task], test_set.phase[task]),
            atol=1e-5,
        )
    support_x, support_y = backend.to_numpy(test_set.tasks.support.x), backend.to_numpy(test_set.tasks.support.y)
    assert numpy.all((support_x >= -5) & (support_x <= 5))
    amplitude, phase = test_set.amplitude[:, None, None], test_set.phase[:, None, None]
    numpy.testing.assert_allclose(support_y, sinusoid.true_function(support_x, amplitude, phase), atol=1e-5)


@pytest.mark.parametrize("bad", [dict(n=0), dict(n=2.5)])
def test_bad_counts_are_rejected(bad):
    with pytest.raises(ValueError, match="positive integer"):
        sinusoid.sample_tasks(numpy.random.default_rng(0), **bad)


def test_mismatched_task_arrays_are_rejected():
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        sinusoid.sample_points(numpy.random.default_rng(0), numpy.ones(3), numpy.ones(2), k=5)
