"""The one task-batch record: T tasks, each with a support set and a query set, task axis first.

Every sampler makes a ``TaskBatch`` and ``maml`` consumes it. What a set holds depends on the problem
and is read only by the problem's task loss:

- regression and classification: ``Examples(x, y)``, ``x: (T, N, ...)``, ``y: (T, N, ...)``
  (``tasks.sinusoid.sample_batch``, ``tasks.episodes.sample_episodes``);
- reinforcement learning: ``rl.reinforce.Trajectories`` of the pre-update (support) and post-update
  (query) policies.

A set only has to say how many tasks it holds (``n_tasks``), so that ``maml`` can give the parameters
their task axis.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Examples:
    """Labelled examples of T tasks: ``x (T, N, ...)`` inputs, ``y (T, N, ...)`` targets (regression)
    or ``(T, N)`` integer labels (classification), on the default device."""

    x: object
    y: object

    def __post_init__(self):
        if not (hasattr(self.x, "shape") and hasattr(self.y, "shape")):
            raise ValueError(f"Examples: x and y must be arrays (T, N, ...), got {type(self.x).__name__} and "
                             f"{type(self.y).__name__}")
        x_shape, y_shape = tuple(self.x.shape), tuple(self.y.shape)
        if len(x_shape) < 2 or len(y_shape) < 2 or x_shape[:2] != y_shape[:2]:
            raise ValueError(f"Examples: x {x_shape} and y {y_shape} must both start with (tasks T, examples N)")
        if x_shape[0] < 1 or x_shape[1] < 1:
            raise ValueError(f"Examples: need at least one task and one example per task, got x {x_shape}")

    @property
    def n_tasks(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of T tasks: ``support`` (what the inner loop adapts on) and ``query`` (what the
    meta-objective scores the adapted parameters on), both sets of the same T tasks."""

    support: object
    query: object

    def __post_init__(self):
        if self.support.n_tasks != self.query.n_tasks:
            raise ValueError(f"TaskBatch: the support set has {self.support.n_tasks} tasks, the query set "
                             f"{self.query.n_tasks}")

    @property
    def n_tasks(self) -> int:
        return self.support.n_tasks
