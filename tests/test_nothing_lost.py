"""A run never destroys work it did not create and every failure a user can cause is one line and a
non-zero exit (the reliability audit's cases), each through the real command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minimaml import train
from minimaml.experiments import navigation, omniglot, sinusoid

SINUSOID = [sys.executable, "-m", "minimaml.experiments.sinusoid", "--no-progress", "--n-test-tasks", "5"]


def _sinusoid(out_dir, *extra):
    done = subprocess.run(SINUSOID + ["--out-dir", str(out_dir), *extra], capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stdout, done.stderr


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_rerun_without_resume_refuses_and_overwrite_moves_the_run_aside(tmp_path):
    """The audit's case 1: a second run without --resume replaced a long run's checkpoint silently."""
    code, _, err = _sinusoid(tmp_path, "--n-iterations", "30")
    assert code == 0, err
    before = (tmp_path / "maml.ckpt.npz").read_bytes()
    code, _, err = _sinusoid(tmp_path, "--n-iterations", "10")
    line = _one_line(err)
    assert code == 1 and "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (tmp_path / "maml.ckpt.npz").read_bytes() == before
    code, out, err = _sinusoid(tmp_path, "--n-iterations", "10", "--overwrite")
    assert code == 0, err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "maml.ckpt.npz").read_bytes() == before
    assert {"results.json", "results.md", "run.json", "pretrained.ckpt.npz"} <= {p.name for p in aside[0].iterdir()}
    assert json.loads((tmp_path / "results.json").read_text())["config"]["n_iterations"] == 10


def test_a_users_own_tmp_files_survive_a_run(tmp_path):
    """The audit's case 2: the lock's clean-up removed every *.tmp in the folder."""
    (tmp_path / "notes.tmp").write_text("mine")
    (tmp_path / ".draft.tmp").write_text("mine too")
    code, _, err = _sinusoid(tmp_path, "--n-iterations", "10")
    assert code == 0, err
    assert (tmp_path / "notes.tmp").read_text() == "mine" and (tmp_path / ".draft.tmp").read_text() == "mine too"


def test_resuming_a_maml_folder_with_another_algorithm_is_refused(tmp_path):
    """The audit's case 3: --resume --algorithm imaml trained iMAML from scratch over MAML's results."""
    code, _, err = _sinusoid(tmp_path, "--n-iterations", "10")
    assert code == 0, err
    results = (tmp_path / "results.json").read_bytes()
    code, _, err = _sinusoid(tmp_path, "--n-iterations", "10", "--resume", "--algorithm", "imaml")
    line = _one_line(err)
    assert code == 1 and "holds a run of --algorithm maml, this run has --algorithm imaml" in line
    assert (tmp_path / "results.json").read_bytes() == results and not (tmp_path / "imaml.ckpt.npz").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, damage):
    code, _, err = _sinusoid(tmp_path, "--n-iterations", "10")
    assert code == 0, err
    path = tmp_path / "maml.ckpt.npz"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        for i in range(100, len(data), 251):
            data[i] ^= 0x10
    path.write_bytes(bytes(data))
    code, _, err = _sinusoid(tmp_path, "--n-iterations", "20", "--resume")
    assert code == 1 and f"cannot read checkpoint {path}: it is damaged" in _one_line(err)


@pytest.mark.parametrize("flags, message", [
    (["--seed", "100000000000000000000"], "--seed must fit a 64-bit integer"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--meta-lr", "-1e-3"], "--meta-lr must be positive, got -0.001"),
    (["--eval-steps", "100000000"], "--eval-steps must be <= 1000"),
    (["--out-dir", ""], "--out-dir is empty"),
    (["--algorithm", "reptile", "--reptile-epsilon-final", "2"],
     "--reptile-epsilon-final (2.0) must not exceed --reptile-epsilon (1.0)"),
    (["--algorithm", "maml_pp", "--maml-pp-min-meta-lr", "0.01"],
     "--maml-pp-min-meta-lr (0.01) must not exceed --meta-lr (0.001)"),
    (["--meta-batch-size", "1000000000000000"], "out of memory"),
])
def test_bad_values_are_one_line_naming_the_flag_before_any_work(tmp_path, flags, message):
    out_dir = [] if "--out-dir" in flags else ["--out-dir", str(tmp_path / "run")]
    done = subprocess.run(SINUSOID + out_dir + flags, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and message in _one_line(done.stderr)
    assert not (tmp_path / "run" / "maml.ckpt.npz").exists()


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = _sinusoid(tmp_path / "file", "--n-iterations", "10")
    assert code == 1 and f"{tmp_path / 'file'} is a file, not a folder" in _one_line(err)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_out_dir_is_one_line(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    code, _, err = _sinusoid(folder / "run", "--n-iterations", "10")
    assert code == 1 and "is not writable" in _one_line(err)


@pytest.mark.parametrize("make, overrides, message", [
    (navigation.config, dict(discount=2.0), "--discount must be <= 1.0, got 2.0"),
    (navigation.config, dict(gae_lambda=5.0), "--gae-lambda must be <= 1.0, got 5.0"),
    (navigation.config, dict(eval_steps=1000), "--eval-steps must be <= 100"),
    (omniglot.config, dict(eval_steps=10**8), "--eval-steps must be <= 1000"),
    (sinusoid.Config.for_profile, dict(seed=2**40), "--seed must be <= 4294967295"),
])
def test_out_of_range_settings_are_refused_when_the_config_is_made(make, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make(**overrides)


def test_navigation_with_fewer_tasks_per_chunk_than_trajectory_panels_finishes(tmp_path):
    """The audit's case 12: --meta-batch-size 2 crashed in the trajectory figure after the results."""
    done = subprocess.run([sys.executable, "-m", "minimaml.experiments.navigation", "--profile", "smoke",
                           "--maml-iterations", "1", "--pretrain-iterations", "1", "--meta-batch-size", "2",
                           "--n-test-tasks", "3", "--n-traj", "2", "--test-batch-steps", "200",
                           "--eval-steps", "1", "--out-dir", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "navigation_trajectories.png").exists()


class FailingSolver(train.Step):
    """A step whose numerics fail on the iterations in ``failing`` (as iMAML's inner solve reports)."""

    def __init__(self, failing):
        self.failing = set(failing)

    def __call__(self, params, state, rng, iteration):
        record = {"loss": 1.0 / (1 + iteration)}
        if iteration in self.failing:
            record["failure"] = "the inner solve did not converge: lower --imaml-inner-lr"
        return {"w": params["w"] + 1.0}, state, record


def test_a_persistent_solver_failure_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    params = {"w": np.zeros(2)}
    with pytest.raises(train.SolverError, match=r"iteration 7: the inner solve did not converge: lower "
                                                r"--imaml-inner-lr \(3 iterations in a row\)\. The checkpoint .* "
                                                r"holds iteration 6, from before the last failing steps"):
        train.run(params, FailingSolver({2, 5, 6, 7, 8}), 20, seed=0, checkpoint_path=path, checkpoint_every=1,
                  progress=False)
    held = train.load_checkpoint(path)
    assert held.iteration == 6 and float(held.params["w"][0]) == 6.0  # not the failing steps' last result
    said = []
    result = train.run(params, FailingSolver({2, 5, 6, 7, 8}), 20, seed=0, progress=False, allow_failures=True,
                       logger=said.append)
    assert result.iterations == 20 and result.failures["iterations"] == 5
    assert result.failures["first"].startswith("iteration 2:") and result.failures["last"].startswith("iteration 8:")
    assert len(said) == 1 and "going on, as failures are allowed" in said[0]
    assert all("failure" not in record for record in result.history)
