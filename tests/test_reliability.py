"""What a user's runs must survive, with real processes: two runs on one folder, SIGKILL at random
moments (resuming must give bit-identical final parameters), leftovers of killed writes, bad sizes
refused before any work, divergence reported rather than tabulated."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minimaml.experiments import miniimagenet, navigation, omniglot, sinusoid
from minimaml.tasks import datadir

SINUSOID = [sys.executable, "-m", "minimaml.experiments.sinusoid", "--no-progress", "--n-test-tasks", "5"]


def _sinusoid(out_dir, *extra, wait=True, **popen):
    process = subprocess.Popen(SINUSOID + ["--out-dir", str(out_dir), *extra], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, **popen)
    if wait:
        out, err = process.communicate(timeout=300)
        return process.returncode, out, err
    return process


def _params(path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files if k.startswith("param/")}


def test_a_second_run_on_the_same_folder_refuses_at_once(tmp_path):
    first = _sinusoid(tmp_path, "--n-iterations", "200000", wait=False)
    try:
        deadline = time.time() + 60
        while not (tmp_path / ".lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        start = time.time()
        code, _, err = _sinusoid(tmp_path, "--n-iterations", "200000")
        assert code == 1 and f"in use by another run (process {first.pid}" in err
        assert time.time() - start < 30  # refused before training, not after
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.communicate()


def test_sigkill_at_random_moments_then_resume_gives_the_same_parameters(tmp_path):
    args = ["--n-iterations", "1500", "--checkpoint-every", "3"]
    code, _, err = _sinusoid(tmp_path / "straight", *args)
    assert code == 0, err
    rng = np.random.default_rng(0)
    killed, resumed_dir = 0, tmp_path / "killed"
    for attempt in range(40):  # each window longer than the last, so a busy machine still gets to the end
        process = _sinusoid(resumed_dir, *args, *(["--resume"] if attempt else []), wait=False)
        try:
            process.wait(timeout=float(rng.uniform(1.0, 4.0)) * (1 + attempt / 4))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            killed += 1
        process.communicate()
        if process.returncode == 0:
            break
    assert process.returncode == 0 and killed >= 2, (killed, process.returncode)
    for name in ("maml", "pretrained"):
        straight = _params(tmp_path / "straight" / f"{name}.ckpt.npz")
        resumed = _params(resumed_dir / f"{name}.ckpt.npz")
        assert straight.keys() == resumed.keys()
        for key in straight:
            np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)
    assert not [f for f in os.listdir(resumed_dir) if f.endswith(".tmp") or f == ".lock"]


def test_a_killed_cache_write_is_cleaned_up_next_time(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "images.npz"
    (tmp_path / f".images.npz.{dead.pid}.abcd.tmp").write_bytes(b"half")
    (tmp_path / f".images.npz.{os.getpid()}.efgh.tmp").write_bytes(b"a live writer's")
    datadir.save_npz(target, x=np.arange(3))
    assert sorted(os.listdir(tmp_path)) == [f".images.npz.{os.getpid()}.efgh.tmp", "images.npz"]


@pytest.mark.parametrize("make, overrides, flag", [
    (omniglot.config, dict(val_every=0), "--val-every must be >= 1, got 0"),
    (omniglot.config, dict(val_every=-1), "--val-every must be >= 1, got -1"),
    (omniglot.config, dict(meta_batch_size=0), "--meta-batch-size must be >= 1"),
    (omniglot.config, dict(n_way=-5), "--n-way must be >= 2, got -5"),
    (omniglot.config, dict(q_train=0), "--q-train must be >= 1"),
    (omniglot.config, dict(n_test_tasks=0), "--n-test-tasks must be >= 1"),
    (omniglot.config, dict(max_train_minutes=-1.0), "--max-train-minutes must be >= 0"),
    (omniglot.config, dict(inner_lr=0.0), "--inner-lr must be positive"),
    (omniglot.config, dict(mode="third_order"), "--mode must be one of second_order, hvp, first_order"),
    (miniimagenet.config, dict(eval_batch=0), "--eval-batch must be >= 1"),
    (sinusoid.Config.for_profile, dict(eval_steps=-1), "--eval-steps must be >= 10, got -1"),
    (sinusoid.Config.for_profile, dict(meta_batch_size=0), "--meta-batch-size must be >= 1"),
    (sinusoid.Config.for_profile, dict(meta_lr=float("nan")), "--meta-lr must be a finite number"),
    (navigation.config, dict(n_traj=0), "--n-traj must be >= 1"),
    (navigation.config, dict(max_kl=-0.1), "--max-kl must be positive"),
])
def test_bad_sizes_are_refused_when_the_config_is_made(make, overrides, flag):
    with pytest.raises(ValueError, match=flag.replace("(", r"\(").replace(")", r"\)")):
        make(**overrides)


def test_a_bad_flag_exits_before_any_work(tmp_path):
    start = time.time()
    code, out, err = _sinusoid(tmp_path, "--eval-steps", "-1")
    assert code == 1 and "--eval-steps must be >= 10, got -1" in err
    assert time.time() - start < 30 and not (tmp_path / "maml.ckpt.npz").exists()


def test_divergence_is_reported_not_tabulated(tmp_path):
    """A huge inner step size: training stays finite, fine-tuning diverges; the table says so, the
    results file holds no NaN and the command exits with status 3."""
    code, out, err = _sinusoid(tmp_path, "--n-iterations", "20", "--inner-lr", "1e6")
    assert code == 3, err
    assert "diverged on 5 of 5 tasks" in out and "nan" not in out.lower()
    assert "fine-tuning diverged" in err and "RuntimeWarning" not in err  # the guard's line, not NumPy's
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_a_diverged_run_resumes_with_a_deliberate_change_of_step_size(tmp_path):
    """The audit's case: --meta-lr 1e4 with a checkpoint every iteration. The run stops naming the
    iteration, the checkpoint it leaves gave a finite loss, a resume with the same settings fails the
    same way, one with another --meta-lr is refused unless allowed, and then it goes on."""
    args = ["--n-iterations", "50", "--checkpoint-every", "1"]
    code, _, err = _sinusoid(tmp_path, *args, "--meta-lr", "1e4")
    assert code == 1 and "loss is nan" in err and "whose parameters gave a finite loss" in err
    assert "RuntimeWarning" not in err
    code, _, err = _sinusoid(tmp_path, *args, "--meta-lr", "1e-3", "--resume")
    assert code == 1 and "meta_lr: 10000.0 in the checkpoint, 0.001 now" in err and "--allow-change meta_lr" in err
    code, out, err = _sinusoid(tmp_path, *args, "--meta-lr", "1e-3", "--resume", "--allow-change", "meta_lr")
    assert code == 0, err
    changes = __import__("json").loads((tmp_path / "results.json").read_text())["changes"]["maml"]
    assert [c["setting"] for c in changes] == ["meta_lr"] and changes[0]["to"] == 0.001


def test_resuming_a_finished_run_with_fewer_iterations_is_refused(tmp_path):
    code, _, err = _sinusoid(tmp_path, "--n-iterations", "30")
    assert code == 0, err
    code, _, err = _sinusoid(tmp_path, "--n-iterations", "10", "--resume")
    assert code == 1 and "done 30 iterations, more than the 10 asked for" in err
    assert '"n_iterations": 30' in (tmp_path / "results.json").read_text()  # the results still say 30


def test_the_pretrained_baseline_is_fine_tuned_with_its_own_step_size(tmp_path):
    """--pretrained-lr sets the baseline's test step, alpha MAML's: a huge alpha diverges MAML's
    fine-tuning only, and the table names both step sizes."""
    code, out, err = _sinusoid(tmp_path, "--n-iterations", "20", "--inner-lr", "1e6", "--pretrained-lr", "0.01")
    assert code == 3, err
    assert "maml/k5 on 5 of 5 tasks" in err and "pretrained/k5" not in err
    assert "alpha = 1000000.0 (the pretrained baseline: 0.01)" in out
