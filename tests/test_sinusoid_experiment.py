"""The sinusoid experiment's own bookkeeping (its learning is tested in test_maml and test_followups)."""

from conftest import ten_second_steps
from minimaml.experiments import sinusoid as experiment


def test_a_resumed_run_reports_the_training_time_of_every_session(tmp_path, monkeypatch):
    """train_seconds is the checkpointed training clock of each method, summed: a resumed run counts the
    sessions before it too, not only the last process's wall time."""
    ten_second_steps(monkeypatch, experiment, ["meta_step", "pretrain_step"])
    config = experiment.Config.for_profile("smoke", n_iterations=3, n_test_tasks=4, out_dir=str(tmp_path))
    first = experiment.run(config, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt.npz")) == ["maml.ckpt.npz", "pretrained.ckpt.npz"]
    assert first["train_seconds"] == 2 * 3 * 10.0
    config = experiment.Config.for_profile("smoke", n_iterations=5, n_test_tasks=4, out_dir=str(tmp_path))
    resumed = experiment.run(config, resume=True, progress=False, allow_changes=("n_iterations",))
    assert resumed["train_seconds"] == 2 * 5 * 10.0
