"""The RL experiments end to end at toy scale: navigation training + evaluation + files, bitwise resume,
the NaN guard, the message locomotion gives without MuJoCo, and the command lines."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from minimaml import files, train
from minimaml.experiments import locomotion, navigation, rl_common
from minimaml.rl.envs import make_env

TINY = dict(maml_iterations=2, pretrain_iterations=2, meta_batch_size=3, n_traj=2, n_test_tasks=4,
            checkpoint_every=1)


def test_navigation_end_to_end(tmp_path):
    cfg = navigation.config("quick", out_dir=str(tmp_path), **TINY)
    results = navigation.run(cfg, progress=False)
    for name in rl_common.METHODS:
        assert len(results["returns"][name]) == cfg.eval_steps + 1
        assert np.array(results["per_task"][name]).shape == (cfg.eval_steps + 1, cfg.n_test_tasks)
    assert [r["iteration"] for r in results["history"]["maml"]] == [0, 1]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["returns"] == results["returns"]
    for figure in ("navigation_steps.png", "navigation_training.png", "navigation_trajectories.png"):
        assert (tmp_path / figure).stat().st_size > 0
    table = rl_common.results_markdown(results)
    assert "-40.41 ± 4.01" in table and "| MAML | ours |" in table
    assert not (tmp_path / files.LOCK_NAME).exists()  # the folder lock is released


def test_a_fresh_run_repeats_its_numbers_exactly(tmp_path):
    """Two fresh runs of the same settings and seed (training, the test tasks' fine-tuning and scores of
    every method) give the same returns bit for bit: what docs/results.md reports is what the code
    gives."""
    small = dict(TINY, test_batch_steps=0, eval_steps=1)
    first, _ = rl_common.run(navigation.config("quick", out_dir=str(tmp_path / "a"), **small), progress=False)
    again, _ = rl_common.run(navigation.config("quick", out_dir=str(tmp_path / "b"), **small), progress=False)
    assert first["per_task"] == again["per_task"] and first["per_task"]["maml"]


def test_the_initial_policy_is_quiet_by_default():
    env = make_env("navigation")
    quiet, loud = rl_common.init_policy(env, 0), rl_common.init_policy(env, 0, output_scale=1.0)
    np.testing.assert_allclose(quiet["layer2.w"], 0.01 * loud["layer2.w"], rtol=1e-6)
    assert navigation.config("quick").init_output_scale == locomotion.config("quick").init_output_scale == 0.01


@pytest.mark.parametrize("method", ["maml", "pretrained"])
def test_resume_gives_identical_params(tmp_path, method):
    cfg = navigation.config("quick", **TINY)
    env = make_env("navigation")
    step = {"maml": rl_common.MetaStep, "pretrained": rl_common.PretrainStep}[method](env, cfg)
    assert isinstance(step, train.Step)
    initial = rl_common.init_policy(env, cfg.seed)

    straight = rl_common.train_policy(method, step, initial, 3, _at(cfg, tmp_path / "a"), progress=False)
    first = rl_common.train_policy(method, step, initial, 1, _at(cfg, tmp_path / "b"), progress=False)
    assert first.iterations == 1 and (tmp_path / "b" / f"{method}.ckpt.npz").exists()
    resumed = rl_common.train_policy(method, step, initial, 3, _at(cfg, tmp_path / "b"), resume=True,
                                     progress=False)
    assert isinstance(resumed, train.TrainResult) and straight.iterations == resumed.iterations == 3
    for key in initial:
        np.testing.assert_array_equal(straight.params[key], resumed.params[key])
    assert any(not np.array_equal(straight.params[k], initial[k]) for k in initial)  # training moved it
    assert [r["iteration"] for r in resumed.history] == [0, 1, 2]
    assert [r["return"] for r in straight.history] == [r["return"] for r in resumed.history]
    expected = {"return", "kl", "accepted", "cg_residual"} | ({"adapted_return"} if method == "maml" else set())
    assert set(straight.history[0]) == {"iteration", "seconds"} | expected


def _at(cfg, folder):
    os.makedirs(folder, exist_ok=True)
    return dataclasses.replace(cfg, out_dir=str(folder))


class _NaNStep(train.Step):
    """A broken step: from iteration ``from_iteration`` on, every parameter comes back NaN."""

    def __init__(self, from_iteration=0):
        self.from_iteration = from_iteration

    def __call__(self, params, state, rng, iteration):
        factor = np.nan if iteration >= self.from_iteration else 1.0
        return {k: v * factor for k, v in params.items()}, state, {"return": -1.0}


def test_non_finite_params_stop_training_before_the_checkpoint(tmp_path):
    cfg = navigation.config("quick", out_dir=str(tmp_path), **TINY)
    initial = rl_common.init_policy(make_env("navigation"), cfg.seed)
    with pytest.raises(train.NonFiniteError, match=r"^iteration 0: parameter 'layer0\.w' has \d+ non-finite"):
        rl_common.train_policy("maml", _NaNStep(), initial, 2, cfg, progress=False)
    assert not (tmp_path / "maml.ckpt.npz").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_non_finite_params_later_leave_the_last_good_checkpoint(tmp_path):
    """NaN at iteration 1 (checkpoint every iteration): the checkpoint on disk is the one after
    iteration 0, finite, never the NaN parameters."""
    cfg = navigation.config("quick", out_dir=str(tmp_path), **TINY)
    initial = rl_common.init_policy(make_env("navigation"), cfg.seed)
    with pytest.raises(train.NonFiniteError, match=r"^iteration 1: parameter 'layer0\.w' has"):
        rl_common.train_policy("maml", _NaNStep(from_iteration=1), initial, 3, cfg, progress=False)
    ckpt = train.load_checkpoint(tmp_path / "maml.ckpt.npz")
    assert ckpt.iteration == 1
    for key in initial:
        np.testing.assert_array_equal(ckpt.params[key], initial[key])


def test_locomotion_without_mujoco_says_how_to_install(tmp_path, monkeypatch, capsys):
    for module in ("mujoco", "gymnasium"):
        monkeypatch.setitem(sys.modules, module, None)  # `import mujoco` now raises ImportError
    cfg = locomotion.config("quick", out_dir=str(tmp_path))
    with pytest.raises(ImportError, match=r"pip install -e '\.\[mujoco\]'"):
        locomotion.run(cfg, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        locomotion.main(["--out-dir", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 2
    assert "pip install -e '.[mujoco]'" in capsys.readouterr().err


def test_scaled_actions_are_rllab_normalize():
    env = rl_common.ScaledActions(make_env("navigation"), 0.1)
    env.reset(np.full((2, 2), 0.4))
    position, _, _ = env.step(np.array([[0.5, -0.5], [3.0, -3.0]]))
    np.testing.assert_allclose(position, [[0.05, -0.05], [0.1, -0.1]])
    assert env.obs_dim == 2 and navigation.config("quick").action_scale == 0.1


def test_locomotion_profiles_follow_the_authors_code():
    full = locomotion.config("full", env="ant_direction")
    assert isinstance(full, rl_common.RLConfig)
    assert (full.meta_batch_size, full.n_traj, full.inner_lr, full.max_kl) == (40, 40, 0.1, 0.01)
    assert full.maml_iterations == 800 and (full.pretrained_lr, full.random_lr) == (0.2, 1.0)
    velocity = locomotion.config("full", env="cheetah_velocity")
    assert (velocity.n_traj, velocity.max_kl) == (10, 0.01)
    assert locomotion.config("reduced", env="cheetah_direction").max_kl == 0.02
    assert locomotion.config("full", env="cheetah_direction", max_kl=0.01).max_kl == 0.01  # the paper's, a flag
    assert (navigation.config("quick").pretrained_lr, navigation.config("quick").random_lr) == (0.5, 0.5)
    assert locomotion.config("quick").env == "cheetah_direction"
    with pytest.raises(ValueError, match="unknown task"):
        locomotion.config("quick", env="hopper")


def test_configs_are_checked_and_give_trpo_settings():
    with pytest.raises(ValueError, match="--meta-batch-size"):
        navigation.config("quick", meta_batch_size=0)
    with pytest.raises(ValueError, match="--inner-lr"):
        locomotion.config("quick", inner_lr=0.0)
    with pytest.raises(ValueError, match="unknown profile"):
        navigation.config("reduced")
    cfg = navigation.config("full", max_kl=0.02, cg_iters=7, cg_damping=1e-4)
    assert (cfg.meta_batch_size, cfg.pretrain_iterations, cfg.inner_lr) == (40, 100, 0.5)
    settings = cfg.trpo()
    assert (settings.max_kl, settings.cg_iters, settings.damping) == (0.02, 7, 1e-4)


def test_settings_that_leave_an_mpi_rank_without_tasks_are_refused_with_the_counts():
    """Each meta-batch and each chunk of test tasks (``meta_batch_size`` at a time) is split over the
    ranks, at least one task each; one process always fits."""
    rl_common.check_ranks(navigation.config("quick", meta_batch_size=1, n_test_tasks=3), 1)
    rl_common.check_ranks(navigation.config("quick", meta_batch_size=5, n_test_tasks=13), 3)  # chunks 5, 5, 3
    with pytest.raises(ValueError, match=r"--meta-batch-size 2 is smaller than the 3 MPI ranks.*mpiexec -n 2"):
        rl_common.check_ranks(navigation.config("quick", meta_batch_size=2, n_test_tasks=4), 3)
    with pytest.raises(ValueError, match=r"--n-test-tasks 11 .* last chunk of 1 test tasks for 2 MPI ranks"):
        rl_common.check_ranks(navigation.config("quick", meta_batch_size=5, n_test_tasks=11), 2)
    with pytest.raises(ValueError, match=r"last chunk of 3 test tasks for 4 MPI ranks"):
        rl_common.check_ranks(navigation.config("quick", meta_batch_size=5, n_test_tasks=3), 4)


def _module_help(module: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "100"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def _option_help(text: str, option: str) -> str:
    """The help of one ``--option`` (its wrapped lines joined, whitespace collapsed)."""
    blocks, current = {}, None
    for line in text.splitlines():
        found = re.match(r"^  (-\S+)", line)
        if found:
            current = found.group(1).rstrip(",")
            blocks[current] = line
        elif current is not None and line.startswith("   "):
            blocks[current] += " " + line
        else:
            current = None
    assert option in blocks, f"{option} is not in the help:\n{text}"
    return " ".join(blocks[option].split())


def test_command_line_help_shows_each_profiles_values():
    nav = _module_help("minimaml.experiments.navigation")
    assert "quick: 50" in _option_help(nav, "--pretrain-iterations")
    assert "full: 100" in _option_help(nav, "--pretrain-iterations")
    assert "quick: 20, smoke: 20, full: 40" in _option_help(nav, "--meta-batch-size")
    assert "quick: 0.5, smoke: 0.5, full: 0.5" in _option_help(nav, "--inner-lr")
    assert "quick: 0.1, smoke: 0.1, full: 0.1" in _option_help(nav, "--action-scale")
    assert "--env" not in nav  # navigation has one env

    loco = _module_help("minimaml.experiments.locomotion")
    assert "quick: 0.1, smoke: 0.1, reduced: 0.1, full: 0.1" in _option_help(loco, "--inner-lr")
    assert "quick: 30, smoke: 2, reduced: 50, full: 500" in _option_help(loco, "--pretrain-iterations")
    assert "ant_direction: quick: 10, smoke: 4, reduced: 10, full: 40" in _option_help(loco, "--n-traj")
    env_help = _option_help(loco, "--env")
    assert "default cheetah_direction" in env_help and "navigation" not in env_help
    assert "navigation" not in _option_help(loco, "--out-dir")


@pytest.mark.parametrize("module, commands", [
    ("minimaml.experiments.rl_common", ("python -m minimaml.experiments.navigation",
                                        "python -m minimaml.experiments.locomotion")),
    ("minimaml.experiments.classification", ("python -m minimaml.experiments.omniglot",
                                             "python -m minimaml.experiments.miniimagenet")),
    ("minimaml.experiments.common", ("python -m minimaml.experiments.", "navigation", "sinusoid", "--help")),
])
def test_library_modules_say_which_command_to_run(module, commands):
    out = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"{module} is a library module, not a command" in out.stderr
    for command in commands:
        assert command in out.stderr, out.stderr
