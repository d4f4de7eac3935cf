"""The Omniglot 5-way 1-shot checkpoint shipped in ``checkpoints/`` (docs/results.md): it loads, this
code's settings still match it, so that ``--resume`` continues or evaluates it, and, with the data at
hand, its best-validation parameters classify test tasks as well as the results say."""

import json
import os
import shutil
from pathlib import Path

import pytest

from minimaml import train
from minimaml.experiments import classification, omniglot
from minimaml.experiments.common import training_settings

FOLDER = Path(__file__).resolve().parent.parent / "checkpoints" / "omniglot-5way-1shot"
ITERATIONS, BEST_ITERATION = 18000, 18000  # as docs/results.md says
DATA = Path(os.environ.get("MINIMAML_DATA", "/nonexistent")) / "omniglot"


def test_the_shipped_checkpoint_matches_this_code():
    """A setting added or changed since it was written would make ``--resume`` refuse it: change the
    checkpoint (re-save it with the new setting's value) or the docs' commands with it."""
    checkpoint = train.load_checkpoint(FOLDER / "maml.ckpt.npz")
    assert (checkpoint.iteration, checkpoint.best_iteration) == (ITERATIONS, BEST_ITERATION)
    settings = training_settings(omniglot.config(5, 1, "conv", "full"))
    assert checkpoint.config == json.loads(json.dumps(settings))
    assert json.loads((FOLDER / "run.json").read_text())["settings"] == checkpoint.config


@pytest.mark.skipif(not DATA.is_dir(), reason="set MINIMAML_DATA to a folder holding omniglot/")
def test_the_shipped_checkpoint_evaluates_without_training(tmp_path):
    """docs/results.md's command on a copy, with 25 test tasks: no iteration is trained, and the best
    parameters classify them far above chance (20 %)."""
    shutil.copytree(FOLDER, tmp_path / "run")
    config = omniglot.config(5, 1, "conv", "full", n_iterations=ITERATIONS, n_test_tasks=25,
                             out_dir=str(tmp_path / "run"))
    results = classification.run(config, resume=True, progress=False)
    assert results["iterations"] == ITERATIONS and results["best_iteration"] == BEST_ITERATION
    assert results["test_accuracy"][-1]["mean"] > 0.85
