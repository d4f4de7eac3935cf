"""The few-shot classification experiment end to end at toy scale, on random images in place of a dataset:
training with validation and early stopping, the test table and files, and resuming a stopped run."""

import dataclasses
import json

import numpy as np
import pytest

from conftest import ten_second_steps
from minimaml import train
from minimaml.experiments import classification, omniglot

TINY = dict(n_iterations=4, meta_batch_size=2, q_train=2, q_eval=2, val_every=2, n_val_tasks=3,
            n_test_tasks=4, eval_batch=2, checkpoint_every=1)


@pytest.fixture
def fake_omniglot(monkeypatch):
    """12 / 6 / 6 classes of 4 random 28x28 images, standing in for the Omniglot splits."""
    rng = np.random.default_rng(0)
    splits = {name: rng.integers(0, 256, size=(n, 4, 28, 28, 1), dtype=np.uint8)
              for name, n in (("train", 12), ("val", 6), ("test", 6))}
    monkeypatch.setattr(classification, "load_splits", lambda config: splits)
    return splits


def _config(tmp_path, **overrides):
    return omniglot.config(5, 1, "mlp", "quick", out_dir=str(tmp_path), **{**TINY, **overrides})


def test_run_trains_validates_tests_and_writes_its_files(tmp_path, fake_omniglot):
    results = classification.run(_config(tmp_path), progress=False)
    assert [r["iteration"] for r in results["validation"]] == [2, 4]
    assert results["best_iteration"] in (2, 4)
    assert len(results["test_accuracy"]) == 3 + 1  # after 0..eval_steps fine-tuning steps
    assert all(0.0 <= row["mean"] <= 1.0 for row in results["test_accuracy"])
    assert json.loads((tmp_path / "results.json").read_text())["test_accuracy"] == results["test_accuracy"]
    for name in ("training.png", "accuracy_vs_steps.png", "maml.ckpt.npz", "validation.json"):
        assert (tmp_path / name).stat().st_size > 0
    table = classification.results_table([results], omniglot.PAPER, "toy")
    assert "| omniglot-mlp-5way-1shot |" in table and "89.7 ± 1.1" in table


def test_a_stopped_run_resumes_where_it_stopped(tmp_path, fake_omniglot):
    straight = classification.run(_config(tmp_path / "straight"), progress=False)
    classification.run(_config(tmp_path / "resumed", n_iterations=2), progress=False)
    first_part = json.loads((tmp_path / "resumed" / "validation.json").read_text())
    resumed = classification.run(_config(tmp_path / "resumed"), resume=True, progress=False)

    assert [r["iteration"] for r in resumed["validation"]] == [2, 4]
    assert resumed["validation"][0] == first_part[0]
    # the training clock goes on from the first part instead of restarting at zero
    assert resumed["train_seconds"] >= first_part[-1]["seconds"]
    straight_params = train.load_checkpoint(str(tmp_path / "straight" / "maml.ckpt.npz")).params
    resumed_params = train.load_checkpoint(str(tmp_path / "resumed" / "maml.ckpt.npz")).params
    for key in straight_params:
        np.testing.assert_array_equal(straight_params[key], resumed_params[key])
    assert [r["val_accuracy"] for r in resumed["validation"]] == [r["val_accuracy"] for r in straight["validation"]]


def _ten_second_steps(monkeypatch, stop_at=None):
    """Each meta-step takes 10 s by the training clock; ``stop_at[0]``: the iteration that raises
    KeyboardInterrupt (None: none does)."""
    ten_second_steps(monkeypatch, classification, ["meta_step"], stop_at)


def test_a_run_stopped_before_its_first_validation_keeps_its_training_time(tmp_path, fake_omniglot, monkeypatch):
    """The training clock lives in the checkpoint: a run interrupted before any validation record and then
    resumed reports the training time of both sessions."""
    stop_at = [3]
    _ten_second_steps(monkeypatch, stop_at)
    config = _config(tmp_path, val_every=4)
    with pytest.raises(KeyboardInterrupt):
        classification.run(config, progress=False)
    assert not (tmp_path / "validation.json").exists() and train.load_checkpoint(
        str(tmp_path / "maml.ckpt.npz")).iteration == 3
    stop_at[0] = None
    resumed = classification.run(config, resume=True, progress=False)
    assert resumed["train_seconds"] == 40.0  # 3 iterations before the stop, 1 after


def test_the_training_budget_ends_meta_training_at_a_validation(tmp_path, fake_omniglot, monkeypatch, capsys):
    """With max_train_minutes, meta-training stops at the first validation past the budget, the test
    tasks are scored, and the table counts the iterations run; a resumed run with a larger budget goes on."""
    _ten_second_steps(monkeypatch)
    config = _config(tmp_path, n_iterations=8, max_train_minutes=0.5)  # 30 s: 3 iterations
    results = classification.run(config, progress=False)
    assert [r["iteration"] for r in results["validation"]] == [2, 4]
    assert results["train_seconds"] == 40.0 and len(results["test_accuracy"]) == 4
    assert "stopped at iteration 4 of 8" in capsys.readouterr().out
    assert classification.results_row(results, omniglot.PAPER)[4] == 4  # the meta-iterations column
    again = classification.run(config, resume=True, progress=False)  # the budget is already spent
    assert [r["iteration"] for r in again["validation"]] == [2, 4]
    longer = classification.run(dataclasses.replace(config, max_train_minutes=1.0), resume=True, progress=False)
    assert [r["iteration"] for r in longer["validation"]] == [2, 4, 6]


@pytest.mark.parametrize("model", ["conv", "mlp"])
def test_non_transductive_evaluation_classifies_each_query_with_the_support_only(model):
    """``one_query_at_a_time`` (Reptile's evaluation) equals a loop that classifies each query image in a
    batch of its task's support images and itself, with one task's adapted parameters; and differs from
    the transductive logits (batch norm's statistics over all queries)."""
    from minimaml import autodiff as ad
    from minimaml import maml
    from minimaml.tasks import episodes

    config = omniglot.config(5, 1, model, "quick")
    net = classification.make_model(config)
    rng = np.random.default_rng(0)
    params = net.init(rng, 5)
    images = rng.integers(0, 256, size=(8, 4, 28, 28, 1), dtype=np.uint8)
    tasks = episodes.sample_episodes(images, 3, 5, 1, 2, rng)
    loss = classification.task_loss(net, 5)
    *_, theta = maml.adaptation_steps(loss, params, tasks.support, 0.4, 1)
    with ad.no_grad():
        got = classification.one_query_at_a_time(net, theta, params, tasks, chunk=3).data
        transductive = net.apply(theta, tasks.query.x).data
        for i in range(3):
            one_task = {n: ad.Tensor(t.data[i:i + 1]) if t.ndim > params[n].ndim else t for n, t in theta.items()}
            for j in range(tasks.query.x.shape[1]):
                batch = np.concatenate([tasks.support.x[i:i + 1], tasks.query.x[i:i + 1, j:j + 1]], axis=1)
                np.testing.assert_allclose(got[i, j], net.apply(one_task, batch).data[0, -1], rtol=1e-4, atol=1e-5)
    assert got.shape == transductive.shape and not np.allclose(got, transductive, atol=1e-3)


def test_a_non_transductive_run_is_scored_and_recorded(tmp_path, fake_omniglot):
    results = classification.run(_config(tmp_path, transductive=False), progress=False)
    assert results["config"]["transductive"] is False
    assert all(0.0 <= row["mean"] <= 1.0 for row in results["test_accuracy"])
