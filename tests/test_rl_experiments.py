"""The RL experiments end to end at toy scale: navigation training + evaluation + files, bitwise resume,
the NaN guard, and the message locomotion gives without MuJoCo."""

import json
import os
import sys

import numpy as np
import pytest

from minimaml import train
from minimaml.experiments import locomotion, navigation, rl_common
from minimaml.rl.envs import make_env

TINY = dict(maml_iterations=2, pretrain_iterations=2, meta_batch_size=3, n_traj=2, n_test_tasks=4,
            checkpoint_every=1)


def test_navigation_end_to_end(tmp_path):
    cfg = navigation.NavigationConfig.for_profile("quick", out_dir=str(tmp_path), **TINY)
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


@pytest.mark.parametrize("method", ["maml", "pretrained"])
def test_resume_gives_identical_params(tmp_path, method):
    cfg = navigation.NavigationConfig.for_profile("quick", **TINY)
    env = make_env("navigation")
    step = {"maml": rl_common.maml_step, "pretrained": rl_common.pretrain_step}[method](env, cfg)
    initial = rl_common.init_policy(env, cfg.seed)

    straight = rl_common.train_policy(method, step, initial, 3, _at(cfg, tmp_path / "a"), progress=False)
    rl_common.train_policy(method, step, initial, 1, _at(cfg, tmp_path / "b"), progress=False)
    resumed = rl_common.train_policy(method, step, initial, 3, _at(cfg, tmp_path / "b"), resume=True,
                                     progress=False)
    for key in initial:
        np.testing.assert_array_equal(straight[0][key], resumed[0][key])
    assert [r["return"] for r in straight[1]] == [r["return"] for r in resumed[1]]


def _at(cfg, folder):
    os.makedirs(folder, exist_ok=True)
    return rl_common.dataclasses.replace(cfg, out_dir=str(folder))


def test_non_finite_params_stop_training_before_the_checkpoint(tmp_path):
    cfg = navigation.NavigationConfig.for_profile("quick", out_dir=str(tmp_path), **TINY)
    initial = rl_common.init_policy(make_env("navigation"), cfg.seed)

    def broken_step(params, rng):
        return {k: v * np.nan for k, v in params.items()}, {"return": -1.0}

    with pytest.raises(train.NonFiniteError, match="iteration 0: parameter"):
        rl_common.train_policy("maml", broken_step, initial, 2, cfg, progress=False)
    assert not (tmp_path / "maml.ckpt.npz").exists()


def test_locomotion_without_mujoco_says_how_to_install(tmp_path, monkeypatch, capsys):
    for module in ("mujoco", "gymnasium"):
        monkeypatch.setitem(sys.modules, module, None)  # `import mujoco` now raises ImportError
    cfg = locomotion.LocomotionConfig.for_profile("quick", out_dir=str(tmp_path))
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
    assert env.obs_dim == 2 and navigation.NavigationConfig.for_profile("quick").action_scale == 0.1


def test_locomotion_profiles_follow_the_paper():
    full = locomotion.LocomotionConfig.for_profile("full", env="ant_direction")
    assert (full.meta_batch_size, full.n_traj, full.inner_lr) == (40, 40, 0.1)
    assert locomotion.LocomotionConfig.for_profile("full", env="cheetah_velocity").n_traj == 20
    with pytest.raises(ValueError, match="unknown task"):
        locomotion.LocomotionConfig.for_profile("quick", env="hopper")


def test_command_line_help(capsys):
    for module in (navigation, locomotion):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0
    assert "--inner-lr" in capsys.readouterr().out
