"""Sinusoid regression tasks (Finn, Abbeel & Levine 2017, Sec. 5.1): ``y = A sin(x - phase)``.

A task draws ``A ~ U[0.1, 5.0]`` and ``phase ~ U[0, pi]``; its points draw ``x ~ U[-5, 5]``: the
paper's ranges, and the defaults of ``DataGenerator`` in the authors' ``data_generator.py``
(github.com/cbfinn/maml). Arrays of a batch of ``T`` tasks carry the task axis first: ``x, y: (T, K, 1)``.

- ``sample_tasks``, ``sample_points``: host (NumPy, float64) draws from a generator passed in.
- ``sample_batch``: a meta-training batch, a ``TaskBatch`` of support and query ``Examples`` on the
  default device.
- ``fixed_test_tasks``: the seeded evaluation set, ``K`` support points per task and a dense grid
  of evaluation points (the query set).
- ``true_function``: ``A sin(x - phase)``, for targets and plots.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy

from minimaml import backend
from minimaml.tasks.batch import Examples, TaskBatch

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


class SinusoidTestSet(NamedTuple):
    """A fixed evaluation set of ``n_tasks`` tasks.

    ``amplitude, phase: (n_tasks,)`` stay on the host (float64) for plots; ``tasks``: the support
    points ``(n_tasks, k_shot, 1)`` and, as the query set, the evaluation grid ``(n_tasks, n_eval, 1)``,
    on the default device.
    """

    amplitude: numpy.ndarray
    phase: numpy.ndarray
    tasks: TaskBatch


def true_function(x, amplitude, phase):
    """``y = A sin(x - phase)`` (NumPy broadcasting: e.g. ``x: (n, k, 1)``, ``A, phase: (n, 1, 1)``)."""
    return amplitude * numpy.sin(x - phase)


def sample_tasks(rng: numpy.random.Generator, n: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """``n`` tasks: ``amplitude ~ U[0.1, 5.0]`` and ``phase ~ U[0, pi]``, each ``(n,)`` float64."""
    _check_positive(n=n)
    amplitude = rng.uniform(*AMPLITUDE_RANGE, size=n)
    phase = rng.uniform(*PHASE_RANGE, size=n)
    return amplitude, phase


def sample_points(rng: numpy.random.Generator, amplitude, phase, k: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """``k`` points per task, ``x ~ U[-5, 5]`` and ``y = A sin(x - phase)``: ``x, y: (n, k, 1)`` float64."""
    _check_positive(k=k)
    amplitude, phase = numpy.asarray(amplitude, dtype=numpy.float64), numpy.asarray(phase, dtype=numpy.float64)
    if amplitude.ndim != 1 or amplitude.shape != phase.shape:
        raise ValueError(f"sample_points: amplitude and phase must both be (n,), got shapes "
                         f"{amplitude.shape} and {phase.shape}")
    x = rng.uniform(*INPUT_RANGE, size=(len(amplitude), k, 1))
    y = true_function(x, amplitude[:, None, None], phase[:, None, None])
    return x, y


def sample_batch(rng: numpy.random.Generator, meta_batch_size: int, k_shot: int, k_query: int | None = None,
                 dtype=numpy.float32) -> TaskBatch:
    """A meta-training batch: ``meta_batch_size`` fresh tasks, each with ``k_shot`` support and
    ``k_query`` (default ``k_shot``) query points drawn independently; arrays ``(T, K, 1)`` of
    ``dtype`` on the default device. Draw order: tasks, support points, query points."""
    amplitude, phase = sample_tasks(rng, meta_batch_size)
    support = sample_points(rng, amplitude, phase, k_shot)
    query = sample_points(rng, amplitude, phase, k_shot if k_query is None else k_query)
    return TaskBatch(_on_device(support, dtype), _on_device(query, dtype))


def _on_device(points: tuple, dtype) -> Examples:
    x, y = points
    return Examples(backend.asarray(x, dtype=dtype), backend.asarray(y, dtype=dtype))


def fixed_test_tasks(n_tasks: int = 600, k_shot: int = 5, seed: int = 0, n_eval: int = 100,
                     dtype=numpy.float32) -> SinusoidTestSet:
    """The evaluation set: ``n_tasks`` tasks drawn from ``seed``, ``k_shot`` random support points per
    task (fine-tuning reuses the same points at every step), and ``n_eval`` evaluation points on an
    evenly spaced grid over ``[-5, 5]`` (the same grid for every task).

    The grid makes the MSE a low-noise estimate of the expected error over ``x ~ U[-5, 5]``; the
    authors' code instead scores ``K`` fresh random points per task. The tasks are drawn before the
    support points, so the same ``seed`` gives the same tasks for every ``k_shot``.
    """
    _check_positive(n_tasks=n_tasks, n_eval=n_eval)
    rng = numpy.random.default_rng(seed)
    amplitude, phase = sample_tasks(rng, n_tasks)
    support_x, support_y = sample_points(rng, amplitude, phase, k_shot)
    grid = numpy.linspace(*INPUT_RANGE, n_eval)
    eval_x = numpy.tile(grid[None, :, None], (n_tasks, 1, 1))
    eval_y = true_function(eval_x, amplitude[:, None, None], phase[:, None, None])
    tasks = TaskBatch(_on_device((support_x, support_y), dtype), _on_device((eval_x, eval_y), dtype))
    return SinusoidTestSet(amplitude, phase, tasks)


def _check_positive(**counts) -> None:
    for name, value in counts.items():
        if int(value) != value or value < 1:
            raise ValueError(f"sinusoid: {name} must be a positive integer, got {value!r}")
