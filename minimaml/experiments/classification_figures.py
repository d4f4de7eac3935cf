"""The few-shot classification experiments' figures, apart from the experiment they draw: validation
accuracy during training, test accuracy against fine-tuning steps."""

from __future__ import annotations

import numpy


def plot_training(results: dict, path: str) -> None:
    """Validation accuracy against meta-iterations (whole-number ticks), the tested (best-validation)
    iteration marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curve = results["validation"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    accuracy = [numpy.nan if r["val_accuracy"] is None else 100 * r["val_accuracy"] for r in curve]
    ax.plot([r["iteration"] for r in curve], accuracy, "o-")
    if curve and results["best_iteration"]:
        ax.axvline(results["best_iteration"], color="grey", linestyle=":", label="best, tested")
        ax.legend(fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(fig, ax, "meta-iteration", "validation accuracy %", results["key"], path)


def plot_steps(results: dict, path: str) -> None:
    """Test accuracy against the number of fine-tuning steps (one tick per step): the mean over the
    test tasks with its 95% CI as a shaded band; a step where fine-tuning diverged (mean None) is a
    gap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["test_accuracy"]
    steps = numpy.arange(len(rows))
    means = 100 * numpy.array([numpy.nan if r["mean"] is None else r["mean"] for r in rows], dtype=float)
    cis = 100 * numpy.array([numpy.nan if r["ci95"] is None else r["ci95"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, means, "o-", label=f"mean over {rows[0]['n']} test tasks")
    ax.fill_between(steps, means - cis, means + cis, alpha=0.25, label="95% CI")
    ax.set_xticks(steps)
    ax.legend(fontsize=7)
    _finish(fig, ax, "gradient steps at test time", "test accuracy %", results["key"], path)


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> None:
    """Label the axes, title the figure, save it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
