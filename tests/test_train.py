"""The one training loop on a noisy linear regression (plain NumPy gradients): exact resume,
checkpoint format and atomicity, the NaN guard, settings checked on resume, validation and the
time budget, logging."""

import os

import numpy
import pytest

from minimaml import train
from minimaml.optim import SGD, Adam
from minimaml.train import GradientStep, NonFiniteError, ResumeError, load_checkpoint, save_checkpoint

TRUE_W = numpy.array([[1.5], [-2.0], [0.5]])


def init_params():
    return {"w": numpy.zeros((3, 1)), "b": numpy.zeros(1)}


def regression_step(params, rng, iteration):
    """MSE of y = x w + b + noise on a fresh batch; exact gradients."""
    x = rng.normal(size=(16, 3))
    y = x @ TRUE_W + 0.3 + 0.1 * rng.normal(size=(16, 1))
    residual = x @ params["w"] + params["b"] - y
    loss = float(numpy.mean(residual**2))
    grads = {"w": 2 * x.T @ residual / len(x), "b": 2 * residual.mean(axis=0)}
    return loss, grads, {"grad_norm": float(numpy.sqrt(sum(numpy.sum(g**2) for g in grads.values())))}


def meta_train(params, optimizer, step_fn, n_iterations, seed, **kwargs):
    """``train.run`` of Adam/SGD on ``step_fn``'s gradients."""
    return train.run(params, GradientStep(step_fn, optimizer), n_iterations, seed, **kwargs)


def run(tmp_path, n_iterations, name="ckpt.npz", step_fn=regression_step, **kwargs):
    kwargs.setdefault("progress", False)
    return meta_train(init_params(), Adam(lr=0.05), step_fn, n_iterations, seed=7,
                      checkpoint_path=tmp_path / name, **kwargs)


def without_seconds(history):
    """The records without the step times (wall-clock, not reproducible)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and numpy.array_equal(a[k], b[k]), k


def test_training_reduces_the_loss_and_logs():
    result = meta_train(init_params(), Adam(lr=0.05), regression_step, 300, seed=0, log_every=100,
                        progress=False)
    assert [r["iteration"] for r in result.history] == [0, 100, 200]
    assert set(result.history[0]) == {"iteration", "seconds", "loss", "grad_norm"}
    assert result.iterations == 300
    assert result.history[-1]["loss"] < 0.1 * result.history[0]["loss"]
    numpy.testing.assert_allclose(result.params["w"], TRUE_W, atol=0.1)
    assert int(result.opt_state["step"]) == 300


def test_each_iteration_gets_the_generator_of_seed_and_iteration():
    seen = []

    def step(params, rng, iteration):
        seen.append((iteration, rng.random()))
        return regression_step(params, rng, iteration)

    meta_train(init_params(), SGD(0.01), step, 3, seed=5, progress=False)
    assert seen == [(i, numpy.random.default_rng([5, i]).random()) for i in range(3)]


@pytest.mark.parametrize("checkpoint_every", [1, 3, 100])
def test_stopped_then_resumed_run_is_bitwise_identical(tmp_path, checkpoint_every):
    full = run(tmp_path, 15, name="full.npz", log_every=2)
    # Stop after 7 of 15 iterations (the final checkpoint is written at 7), then resume.
    run(tmp_path, 7, checkpoint_every=checkpoint_every, log_every=2)
    assert load_checkpoint(tmp_path / "ckpt.npz").iteration == 7
    resumed = run(tmp_path, 15, checkpoint_every=checkpoint_every, log_every=2, resume=True)
    assert_bitwise_equal(resumed.params, full.params)
    assert_bitwise_equal(resumed.opt_state, full.opt_state)
    assert without_seconds(resumed.history) == without_seconds(full.history)


def test_crashed_then_resumed_run_is_bitwise_identical(tmp_path):
    full = run(tmp_path, 15, name="full.npz")

    def crashing_step(params, rng, iteration):
        if iteration == 8:
            raise KeyboardInterrupt
        return regression_step(params, rng, iteration)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, 15, step_fn=crashing_step, checkpoint_every=3)
    assert load_checkpoint(tmp_path / "ckpt.npz").iteration == 6
    resumed = run(tmp_path, 15, checkpoint_every=3, resume=True)
    assert_bitwise_equal(resumed.params, full.params)
    assert load_checkpoint(tmp_path / "ckpt.npz").iteration == 15


def test_the_training_clock_goes_on_across_a_resume(tmp_path, monkeypatch):
    """The checkpoint carries the seconds spent in meta_train, so a run stopped and resumed (even before
    anything else recorded its time) reports the time of both sessions. The clock is faked: each
    iteration takes 10 s."""
    clock = [0.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])

    def ten_second_step(params, rng, iteration):
        clock[0] += 10.0
        return regression_step(params, rng, iteration)

    first = run(tmp_path, 4, step_fn=ten_second_step)
    assert first.seconds == 40.0 and load_checkpoint(tmp_path / "ckpt.npz").seconds == 40.0
    clock[0] += 1000.0  # time between the sessions is not training time
    resumed = run(tmp_path, 7, step_fn=ten_second_step, checkpoint_every=2, resume=True)
    assert resumed.seconds == 70.0 and load_checkpoint(tmp_path / "ckpt.npz").seconds == 70.0
    fresh = run(tmp_path, 7, name="fresh.npz", step_fn=ten_second_step, resume=True)  # nothing to resume
    assert fresh.seconds == 70.0


def test_a_checkpoint_without_a_clock_reads_as_zero_seconds(tmp_path):
    """Checkpoints written before the ``seconds`` entry existed still load (and resume)."""
    run(tmp_path, 3)
    with numpy.load(tmp_path / "ckpt.npz") as data:
        arrays = {k: data[k] for k in data.files if k != "seconds"}
    numpy.savez(tmp_path / "old.npz", **arrays)
    assert load_checkpoint(tmp_path / "old.npz").seconds == 0.0


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    fresh = run(tmp_path, 5, name="a.npz")
    resumed = run(tmp_path, 5, name="b.npz", resume=True)
    assert_bitwise_equal(resumed.params, fresh.params)


def test_resume_with_another_seed_or_model_is_an_error(tmp_path):
    run(tmp_path, 3)
    with pytest.raises(ResumeError, match="seed 7.*seed 8"):
        meta_train(init_params(), Adam(0.05), regression_step, 5, seed=8, checkpoint_path=tmp_path / "ckpt.npz",
                   resume=True, progress=False)
    with pytest.raises(ResumeError, match="do not match"):
        meta_train({"w": numpy.zeros((4, 1)), "b": numpy.zeros(1)}, Adam(0.05), regression_step, 5, seed=7,
                   checkpoint_path=tmp_path / "ckpt.npz", resume=True, progress=False)


def test_checkpoint_format_is_a_plain_npz(tmp_path):
    result = run(tmp_path, 4, log_every=2)
    with numpy.load(tmp_path / "ckpt.npz", allow_pickle=False) as data:
        assert set(data.files) == {
            "iteration", "seed", "seconds", "param/w", "param/b",
            "opt/step", "opt/m/w", "opt/v/w", "opt/m/b", "opt/v/b",
            "history/iteration", "history/seconds", "history/loss", "history/grad_norm",
        }
        assert int(data["iteration"]) == 4 and int(data["seed"]) == 7
        numpy.testing.assert_array_equal(data["history/iteration"], [0, 2])
        numpy.testing.assert_array_equal(data["param/w"], result.params["w"])
    ckpt = load_checkpoint(tmp_path / "ckpt.npz")
    assert ckpt.history == result.history
    assert_bitwise_equal(ckpt.opt_state, result.opt_state)


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_non_finite_values_stop_the_run_and_keep_the_last_checkpoint(tmp_path, bad):
    def step(params, rng, iteration):
        loss, grads, metrics = regression_step(params, rng, iteration)
        if iteration == 5:
            if bad == "loss":
                loss = float("inf")
            else:
                grads["b"] = numpy.array([numpy.nan])
        return loss, grads, metrics

    with pytest.raises(NonFiniteError, match="iteration 5" + (": loss is inf" if bad == "loss" else ".*'b'")):
        run(tmp_path, 10, step_fn=step, checkpoint_every=2)
    ckpt = load_checkpoint(tmp_path / "ckpt.npz")
    assert ckpt.iteration == 4
    assert all(numpy.all(numpy.isfinite(p)) for p in ckpt.params.values())
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # no temporary file left behind


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    params = init_params()
    save_checkpoint(path, params, {"step": numpy.asarray(1)}, 1, 0, [])

    def broken_savez(file, **arrays):
        file.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(train.numpy, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": numpy.ones((3, 1)), "b": numpy.ones(1)}, {"step": numpy.asarray(2)}, 2, 0, [])
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    ckpt = load_checkpoint(path)
    assert ckpt.iteration == 1
    assert_bitwise_equal(ckpt.params, params)


def test_changing_metric_names_is_an_error():
    def step(params, rng, iteration):
        loss, grads, _ = regression_step(params, rng, iteration)
        return loss, grads, {f"metric{iteration}": 1.0}

    with pytest.raises(ValueError, match="same metrics"):
        meta_train(init_params(), SGD(0.01), step, 3, seed=0, log_every=1, progress=False)


def test_unreadable_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "ckpt.npz"
    path.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="ckpt.npz"):
        load_checkpoint(path)


# --- the NaN guard keeps a usable checkpoint ------------------------------------------------------
def test_a_non_finite_loss_leaves_the_checkpoint_of_the_last_finite_loss(tmp_path):
    """With a checkpoint every iteration, the checkpoint written after update 4 holds the parameters that
    give the non-finite loss of iteration 5: the run falls back to the one before, which resumes."""
    def step(params, rng, iteration):
        loss, grads, metrics = regression_step(params, rng, iteration)
        return (float("nan") if iteration == 5 else loss), grads, metrics

    with pytest.raises(NonFiniteError, match=r"iteration 5: loss is nan\. The checkpoint .* holds "
                                             r"iteration 4, whose parameters gave a finite loss"):
        run(tmp_path, 10, step_fn=step, checkpoint_every=1)
    ckpt = load_checkpoint(tmp_path / "ckpt.npz")
    assert ckpt.iteration == 4 and [r["iteration"] for r in ckpt.history] == [0, 1, 2, 3]
    full = run(tmp_path, 10, name="full.npz")
    resumed = run(tmp_path, 10, resume=True)  # a step that no longer fails goes on from there exactly
    assert_bitwise_equal(resumed.params, full.params)


@pytest.mark.filterwarnings("ignore:overflow")
def test_non_finite_parameters_stop_the_run(tmp_path):
    def step(params, rng, iteration):
        loss, grads, metrics = regression_step(params, rng, iteration)
        # with SGD(1e10): a step of 0.01 times the gradient, then at iteration 3 a finite gradient that
        # takes the parameters past the largest float
        scale = 1e300 if iteration == 3 else 1e-12
        return loss, {k: g * scale for k, g in grads.items()}, metrics

    with pytest.raises(NonFiniteError, match="iteration 3: parameter 'w' has"):
        meta_train(init_params(), SGD(1e10), step, 6, seed=7, checkpoint_path=tmp_path / "ckpt.npz",
                   checkpoint_every=1, progress=False)
    ckpt = load_checkpoint(tmp_path / "ckpt.npz")
    assert ckpt.iteration == 3 and all(numpy.all(numpy.isfinite(p)) for p in ckpt.params.values())


# --- settings checked on resume --------------------------------------------------------------------
SETTINGS = {"meta_lr": 0.05, "inner_lr": 0.01}


def test_resuming_with_other_settings_is_an_error_naming_them(tmp_path):
    run(tmp_path, 3, config=SETTINGS)
    with pytest.raises(ResumeError, match=r"inner_lr: 0\.01 in the checkpoint, 0\.5 now.*--allow-change inner_lr"):
        run(tmp_path, 6, config={**SETTINGS, "inner_lr": 0.5}, resume=True)
    assert load_checkpoint(tmp_path / "ckpt.npz").iteration == 3  # nothing was run
    assert load_checkpoint(tmp_path / "ckpt.npz").config == SETTINGS


def test_an_allowed_change_goes_on_and_is_recorded(tmp_path):
    run(tmp_path, 3, config=SETTINGS)
    resumed = run(tmp_path, 6, config={**SETTINGS, "meta_lr": 0.01}, allow_changes=("meta_lr",), resume=True)
    assert resumed.changes == [{"iteration": 3, "setting": "meta_lr", "from": 0.05, "to": 0.01}]
    ckpt = load_checkpoint(tmp_path / "ckpt.npz")
    assert ckpt.iteration == 6 and ckpt.changes == resumed.changes and ckpt.config["meta_lr"] == 0.01


def test_resuming_with_fewer_iterations_than_done_is_an_error(tmp_path):
    run(tmp_path, 6)
    with pytest.raises(ResumeError, match="done 6 iterations, more than the 4 asked for"):
        run(tmp_path, 4, resume=True)
    assert run(tmp_path, 6, resume=True).iterations == 6  # the same length: nothing more to do


@pytest.mark.parametrize("bad", [dict(n_iterations=-1), dict(checkpoint_every=0), dict(log_every=0),
                                 dict(validation=train.Validation(lambda p: 0.0, 0)),
                                 dict(max_train_seconds=-60.0)])
def test_bad_loop_sizes_are_errors_before_any_step(tmp_path, bad):
    steps = []

    def step(params, rng, iteration):
        steps.append(iteration)
        return regression_step(params, rng, iteration)

    args = {"n_iterations": 5, **bad}
    with pytest.raises(ValueError, match=next(iter(bad)).split("=")[0].replace("max_train_seconds", "max_train")):
        run(tmp_path, step_fn=step, **args)
    assert steps == []


# --- validation and the time budget ---------------------------------------------------------------
def test_validation_keeps_the_best_parameters_and_resumes_with_them(tmp_path):
    scores = iter([0.2, 0.9, 0.5, 0.7, 0.1])
    result = run(tmp_path, 10, validation=train.Validation(lambda p: next(scores), 2), checkpoint_every=100)
    assert [r["iteration"] for r in result.validation] == [2, 4, 6, 8, 10]
    assert result.best_iteration == 4
    at_four = run(tmp_path, 4, name="four.npz")
    assert_bitwise_equal(result.best_params, at_four.params)
    ckpt = load_checkpoint(tmp_path / "ckpt.npz")
    assert ckpt.best_iteration == 4 and [r["score"] for r in ckpt.validation] == [0.2, 0.9, 0.5, 0.7, 0.1]
    assert_bitwise_equal(ckpt.best_params, at_four.params)


def test_the_time_budget_stops_at_the_first_validation_past_it(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])

    def ten_second_step(params, rng, iteration):
        clock[0] += 10.0
        return regression_step(params, rng, iteration)

    lines = []
    result = run(tmp_path, 100, step_fn=ten_second_step, validation=train.Validation(lambda p: 0.5, 3),
                 max_train_seconds=45.0, logger=lines.append)
    assert result.iterations == 6 and result.seconds == 60.0  # 45 s pass during iterations 4..6
    assert "stopped at iteration 6 of 100" in lines[-1]
    again = run(tmp_path, 100, step_fn=ten_second_step, validation=train.Validation(lambda p: 0.5, 3),
                max_train_seconds=45.0, resume=True)
    assert again.iterations == 6  # the budget is spent: nothing more
    longer = run(tmp_path, 100, step_fn=ten_second_step, validation=train.Validation(lambda p: 0.5, 3),
                 max_train_seconds=85.0, resume=True)
    assert longer.iterations == 9


def test_a_history_with_fewer_columns_resumes_with_its_columns(tmp_path):
    """A checkpoint written before the loop logged ``seconds`` (or before a step logged a new metric)
    still resumes; its history keeps the columns it had."""
    run(tmp_path, 3)
    with numpy.load(tmp_path / "ckpt.npz") as data:
        arrays = {k: data[k] for k in data.files if k not in ("history/seconds", "history/grad_norm")}
    numpy.savez(tmp_path / "old.npz", **arrays)
    resumed = run(tmp_path, 6, name="old.npz", resume=True)
    assert [set(r) for r in resumed.history] == [{"iteration", "loss"}] * 6
