"""The sinusoid experiment's own bookkeeping (its learning is tested in test_maml and test_followups)."""

from minimaml import train
from minimaml.experiments import sinusoid as experiment


def test_a_resumed_run_reports_the_training_time_of_every_session(tmp_path, monkeypatch):
    """train_seconds is the checkpointed training clock of each method, summed: a resumed run counts the
    sessions before it too, not only the last process's wall time."""
    clock = [0.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])

    class TenSeconds(train.Step):
        def __init__(self, step):
            self.step = step

        def init(self, params):
            return self.step.init(params)

        def __call__(self, params, state, rng, iteration):
            clock[0] += 10.0
            return self.step(params, state, rng, iteration)

    for name in ("meta_step", "pretrain_step"):
        real = getattr(experiment, name)
        monkeypatch.setattr(experiment, name, lambda *args, real=real: TenSeconds(real(*args)))
    config = experiment.Config.for_profile("smoke", n_iterations=3, n_test_tasks=4, out_dir=str(tmp_path))
    first = experiment.run(config, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt.npz")) == ["maml.ckpt.npz", "pretrained.ckpt.npz"]
    assert first["train_seconds"] == 2 * 3 * 10.0
    config = experiment.Config.for_profile("smoke", n_iterations=5, n_test_tasks=4, out_dir=str(tmp_path))
    resumed = experiment.run(config, resume=True, progress=False, allow_changes=("n_iterations",))
    assert resumed["train_seconds"] == 2 * 5 * 10.0
