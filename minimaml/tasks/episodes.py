"""N-way K-shot episodes drawn from a class array ``images: (C, M, H, W, ch)`` uint8.

Each task draws ``n_way`` distinct classes; the class drawn in position j gets label j, and since the
draw is a random ordered sample, every task has a fresh random class-to-label assignment (the paper's
guard against memorising labels). Each class gives ``k_shot`` support and ``k_query`` query images,
all distinct. Within a set, examples are ordered by label: ``y = [0]*K + [1]*K + ...``.

Tasks are first drawn as indices (``TaskIndex``), then gathered into batched arrays (a ``TaskBatch``),
so a fixed evaluation set (e.g. 600 test tasks) costs only its indices until it is iterated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from minimaml import backend
from minimaml.tasks.batch import Examples, TaskBatch


@dataclass(frozen=True)
class ClassSplit:
    """Images grouped by class. images: (C, M, H, W, ch) uint8; names: (C,) str, one per class."""

    images: np.ndarray
    names: np.ndarray


@dataclass(frozen=True)
class TaskIndex:
    """Which images make each task. classes: (T, N) class index of label j; images: (T, N, K+Q)."""

    classes: np.ndarray
    images: np.ndarray
    k_shot: int

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: slice) -> TaskIndex:
        return TaskIndex(self.classes[index], self.images[index], self.k_shot)


def draw_tasks(
    n_classes: int, n_per_class: int, n_tasks: int, n_way: int, k_shot: int, k_query: int,
    rng: np.random.Generator,
) -> TaskIndex:
    """Draw ``n_tasks`` tasks over ``n_classes`` classes of ``n_per_class`` images each."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"episodes: rng must be a numpy.random.Generator (host sampling), got {type(rng)}")
    if not 1 <= n_way <= n_classes:
        raise ValueError(f"episodes: n_way={n_way} needs 1 <= n_way <= number of classes ({n_classes})")
    if n_tasks < 1:
        raise ValueError(f"episodes: need at least one task, got n_tasks={n_tasks}")
    if k_shot < 1 or k_query < 1 or k_shot + k_query > n_per_class:
        raise ValueError(
            f"episodes: k_shot={k_shot}, k_query={k_query} need k_shot >= 1, k_query >= 1 and "
            f"k_shot + k_query <= images per class ({n_per_class})"
        )
    per_class = k_shot + k_query
    classes = np.empty((n_tasks, n_way), dtype=np.int64)
    images = np.empty((n_tasks, n_way, per_class), dtype=np.int64)
    for t in range(n_tasks):
        classes[t] = rng.choice(n_classes, size=n_way, replace=False)  # random order = random labels
        for j in range(n_way):
            images[t, j] = rng.choice(n_per_class, size=per_class, replace=False)
    return TaskIndex(classes, images, k_shot)


def gather(images: np.ndarray, tasks: TaskIndex) -> TaskBatch:
    """The arrays of ``tasks`` from ``images: (C, M, H, W, ch)`` uint8, moved to the default device:
    support ``x (T, N*K, H, W, ch)`` float32 in [0, 1], ``y (T, N*K)`` int64; query ``x (T, N*Q, H, W, ch)``,
    ``y (T, N*Q)``.

    The uint8 pixels are moved first and scaled to float32 [0, 1] there (4x less to copy to a GPU).
    """
    _check_images(images)
    n_tasks, n_way, per_class = tasks.images.shape
    k_shot, k_query = tasks.k_shot, per_class - tasks.k_shot
    pixels = images[tasks.classes[:, :, None], tasks.images]  # (T, N, K+Q, H, W, ch)
    shape = images.shape[2:]
    support = pixels[:, :, :k_shot].reshape(n_tasks, n_way * k_shot, *shape)
    query = pixels[:, :, k_shot:].reshape(n_tasks, n_way * k_query, *shape)
    labels = np.arange(n_way, dtype=np.int64)
    return TaskBatch(
        support=Examples(x=backend.asarray(support).astype(np.float32) / 255,
                         y=backend.asarray(np.tile(np.repeat(labels, k_shot), (n_tasks, 1)))),
        query=Examples(x=backend.asarray(query).astype(np.float32) / 255,
                       y=backend.asarray(np.tile(np.repeat(labels, k_query), (n_tasks, 1)))),
    )


def sample_episodes(
    images: np.ndarray, n_tasks: int, n_way: int, k_shot: int, k_query: int, rng: np.random.Generator
) -> TaskBatch:
    """A fresh meta-batch of ``n_tasks`` tasks from ``images: (C, M, H, W, ch)`` uint8."""
    _check_images(images)
    return gather(images, draw_tasks(*images.shape[:2], n_tasks, n_way, k_shot, k_query, rng))


def fixed_tasks(
    images: np.ndarray, n_tasks: int, n_way: int, k_shot: int, k_query: int, seed: int
) -> TaskIndex:
    """A fixed, seeded set of evaluation tasks (e.g. 600 test tasks): the same seed, the same tasks."""
    _check_images(images)
    return draw_tasks(*images.shape[:2], n_tasks, n_way, k_shot, k_query, np.random.default_rng(seed))


def iterate_batches(images: np.ndarray, tasks: TaskIndex, meta_batch_size: int) -> Iterator[TaskBatch]:
    """``tasks`` in order, ``meta_batch_size`` at a time (the last batch may be smaller)."""
    if meta_batch_size < 1:
        raise ValueError(f"episodes: meta_batch_size must be >= 1, got {meta_batch_size}")
    for start in range(0, len(tasks), meta_batch_size):
        yield gather(images, tasks[start : start + meta_batch_size])


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 5 or images.dtype != np.uint8:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
        raise ValueError(f"episodes: expected a host uint8 array images: (C, M, H, W, ch), got {got}")
