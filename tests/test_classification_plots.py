"""The classification figures: accuracy against fine-tuning steps (one tick per step, a 95% CI band,
a gap where fine-tuning diverged) and validation accuracy against meta-iterations."""

import matplotlib
import matplotlib.pyplot as plt
import numpy
import pytest

from minimaml.experiments import classification_figures

matplotlib.use("Agg")


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions make, kept open for inspection instead of closed."""
    made, close = [], plt.close
    monkeypatch.setattr(plt, "close", made.append)
    yield made
    for fig in made:
        close(fig)


def row(mean, ci95, n=600):
    return {"mean": mean, "ci95": ci95, "n": n, "n_diverged": 0 if mean is not None else 3}


def test_accuracy_against_steps_has_integer_ticks_and_a_ci_band(tmp_path, figures):
    results = {"key": "omniglot-5way-1shot",
               "test_accuracy": [row(0.2, 0.01), row(0.9, 0.02), row(None, None), row(0.95, 0.005)]}
    path = tmp_path / "steps.png"
    classification_figures.plot_steps(results, str(path))
    assert path.stat().st_size > 0
    (ax,) = figures[0].axes
    assert list(ax.get_xticks()) == [0, 1, 2, 3]
    (line,) = ax.get_lines()
    numpy.testing.assert_array_equal(line.get_ydata(), [20.0, 90.0, numpy.nan, 95.0])  # diverged: a gap
    (band,) = ax.collections
    corners = numpy.concatenate([p.vertices for p in band.get_paths()])
    assert corners[:, 1].min() == pytest.approx(19.0) and corners[:, 1].max() == pytest.approx(95.5)
    for step, low, high in ((0, 19.0, 21.0), (1, 88.0, 92.0), (3, 94.5, 95.5)):
        at_step = corners[corners[:, 0] == step, 1]
        assert at_step.min() == pytest.approx(low) and at_step.max() == pytest.approx(high)
    assert not (corners[:, 0] == 2).any()  # no band where fine-tuning diverged
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mean over 600 test tasks", "95% CI"]


def test_validation_curve_has_integer_ticks_and_marks_the_tested_iteration(tmp_path, figures):
    results = {"key": "omniglot-5way-1shot", "best_iteration": 2,
               "validation": [{"iteration": 1, "val_accuracy": 0.5}, {"iteration": 2, "val_accuracy": 0.75},
                              {"iteration": 3, "val_accuracy": 0.7}]}
    classification_figures.plot_training(results, str(tmp_path / "training.png"))
    (ax,) = figures[0].axes
    ticks = ax.get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)
    curve, best = ax.get_lines()
    numpy.testing.assert_array_equal(curve.get_xdata(), [1, 2, 3])
    numpy.testing.assert_allclose(curve.get_ydata(), [50.0, 75.0, 70.0])
    assert list(best.get_xdata()) == [2, 2]
