"""The N-way K-shot sampler: shapes, labels, disjoint support/query, seeding, fixed evaluation tasks."""

import numpy as np
import pytest

from minimaml.backend import to_numpy
from minimaml.tasks.batch import Examples, TaskBatch
from minimaml.tasks.episodes import draw_tasks, fixed_tasks, gather, iterate_batches, sample_episodes


def tagged_images(n_classes=10, n_per_class=8, size=4):
    """images: (C, M, size, size, 1) uint8 whose pixel (0, 0) holds the class and (0, 1) the image index."""
    images = np.zeros((n_classes, n_per_class, size, size, 1), dtype=np.uint8)
    images[:, :, 0, 0, 0] = np.arange(n_classes)[:, None]
    images[:, :, 0, 1, 0] = np.arange(n_per_class)[None, :]
    images[:, :, 1:, :, 0] = 255
    return images


def decode(x):
    """(class, image index) of each example of x: (T, S, H, W, 1) float32 in [0, 1]."""
    x = np.rint(to_numpy(x) * 255).astype(int)
    return x[:, :, 0, 0, 0], x[:, :, 0, 1, 0]


def test_shapes_dtypes_and_range():
    images = tagged_images()
    ep = sample_episodes(images, n_tasks=3, n_way=5, k_shot=2, k_query=3, rng=np.random.default_rng(0))
    assert isinstance(ep, TaskBatch) and isinstance(ep.support, Examples) and isinstance(ep.query, Examples)
    assert ep.n_tasks == ep.support.n_tasks == ep.query.n_tasks == 3
    assert to_numpy(ep.support.x).shape == (3, 10, 4, 4, 1) and to_numpy(ep.support.x).dtype == np.float32
    assert to_numpy(ep.query.x).shape == (3, 15, 4, 4, 1) and to_numpy(ep.query.x).dtype == np.float32
    assert to_numpy(ep.support.y).shape == (3, 10) and to_numpy(ep.support.y).dtype == np.int64
    assert to_numpy(ep.query.y).shape == (3, 15) and to_numpy(ep.query.y).dtype == np.int64
    assert to_numpy(ep.support.x).min() >= 0 and to_numpy(ep.support.x).max() == 1.0


def test_labels_balanced_classes_distinct_and_support_query_disjoint():
    images = tagged_images()
    n_way, k_shot, k_query = 5, 3, 4
    ep = sample_episodes(images, 20, n_way, k_shot, k_query, np.random.default_rng(1))
    s_class, s_image = decode(ep.support.x)
    q_class, q_image = decode(ep.query.x)
    s_y, q_y = to_numpy(ep.support.y), to_numpy(ep.query.y)
    for t in range(20):
        assert np.array_equal(np.bincount(s_y[t], minlength=n_way), [k_shot] * n_way)
        assert np.array_equal(np.bincount(q_y[t], minlength=n_way), [k_query] * n_way)
        label_class = {}
        for label in range(n_way):
            classes = set(s_class[t, s_y[t] == label]) | set(q_class[t, q_y[t] == label])
            assert len(classes) == 1, "one label must mean one class within a task"
            label_class[label] = classes.pop()
            support = set(s_image[t, s_y[t] == label])
            query = set(q_image[t, q_y[t] == label])
            assert len(support) == k_shot and len(query) == k_query and not support & query
        assert len(set(label_class.values())) == n_way, "the N classes of a task must be distinct"


def test_label_assignment_is_fresh_per_task():
    images = tagged_images(n_classes=5)  # every task uses all 5 classes: only the labelling differs
    ep = sample_episodes(images, 200, 5, 1, 1, np.random.default_rng(2))
    s_class, _ = decode(ep.support.x)  # support is ordered by label: s_class[t, j] is the class of label j
    assert len({tuple(row) for row in s_class}) > 50
    assert np.array_equal(np.unique(s_class[:, 0]), np.arange(5)), "label 0 should fall on every class"


def test_seeded_reproducibility():
    images = tagged_images()
    first = sample_episodes(images, 4, 5, 1, 2, np.random.default_rng(7))
    again = sample_episodes(images, 4, 5, 1, 2, np.random.default_rng(7))
    other = sample_episodes(images, 4, 5, 1, 2, np.random.default_rng(8))
    for part in ("support", "query"):
        for name in ("x", "y"):
            assert np.array_equal(to_numpy(getattr(getattr(first, part), name)),
                                  to_numpy(getattr(getattr(again, part), name)))
    assert not np.array_equal(to_numpy(first.support.x), to_numpy(other.support.x))


def test_fixed_tasks_iterated_in_meta_batches():
    images = tagged_images()
    tasks = fixed_tasks(images, n_tasks=10, n_way=3, k_shot=1, k_query=2, seed=5)
    assert np.array_equal(tasks.classes, fixed_tasks(images, 10, 3, 1, 2, seed=5).classes)
    batches = list(iterate_batches(images, tasks, meta_batch_size=4))
    assert all(isinstance(b, TaskBatch) for b in batches)
    assert [b.n_tasks for b in batches] == [4, 4, 2]
    assert [to_numpy(b.query.x).shape[0] for b in batches] == [4, 4, 2]
    whole = gather(images, tasks)
    assert np.array_equal(np.concatenate([to_numpy(b.query.x) for b in batches]), to_numpy(whole.query.x))
    assert np.array_equal(np.concatenate([to_numpy(b.support.x) for b in batches]), to_numpy(whole.support.x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_way=11, k_shot=1, k_query=1), "n_way=11"),
        (dict(n_way=5, k_shot=5, k_query=4), r"images per class \(8\)"),
        (dict(n_way=5, k_shot=0, k_query=1), "k_shot >= 1"),
        (dict(n_way=5, k_shot=1, k_query=0), "k_query >= 1"),
    ],
)
def test_bad_task_sizes_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        draw_tasks(10, 8, 2, rng=np.random.default_rng(0), **kwargs)


def test_zero_tasks_are_errors():
    with pytest.raises(ValueError, match="at least one task, got n_tasks=0"):
        draw_tasks(10, 8, 0, 5, 1, 1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least one task"):
        sample_episodes(tagged_images(), 0, 5, 1, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least one task"):
        fixed_tasks(tagged_images(), n_tasks=0, n_way=5, k_shot=1, k_query=1, seed=0)


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="uint8"):
        sample_episodes(tagged_images().astype(np.float32), 1, 2, 1, 1, np.random.default_rng(0))
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        draw_tasks(10, 8, 1, 2, 1, 1, rng=0)
