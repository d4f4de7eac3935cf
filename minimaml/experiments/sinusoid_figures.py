"""The sinusoid experiment's figures (paper Figs. 2 and 3), apart from the experiment they draw."""

from __future__ import annotations

import numpy

from .. import autodiff as ad
from .. import backend, maml
from ..tasks import sinusoid


def plot_fits(trained: dict, adaptation: dict, apply, config, path: str) -> None:
    """Paper Fig. 2: a test task's true curve, its K points, and each model (``apply``) after 1 and 10
    steps (``adaptation[name].adaptation_steps`` on its MSE)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True, sharey=True)
    grid = numpy.linspace(-5, 5, 200)
    for row, k in enumerate((5, 10)):
        test_set = sinusoid.fixed_test_tasks(1, k_shot=k, seed=config.seed + 2)
        x = backend.asarray(numpy.tile(grid[None, :, None], (1, 1, 1)), dtype=numpy.float32)
        for col, (name, params) in enumerate(trained.items()):
            ax = axes[row, col]
            ax.plot(grid, sinusoid.true_function(grid, test_set.amplitude[0], test_set.phase[0]),
                    "r", label="ground truth")
            support = test_set.tasks.support
            steps = adaptation[name].adaptation_steps(maml.supervised_loss(apply, ad.mse), params, support, 10)
            for step, theta in enumerate(steps):
                if step in (0, 1, 10):
                    with ad.no_grad():
                        y = backend.to_numpy(apply(theta, x).data)[0, :, 0]
                    ax.plot(grid, y, {0: ":", 1: "--", 10: "-"}[step], color="C0" if step else "C2",
                            label={0: "before update", 1: "after 1 grad step", 10: "after 10 grad steps"}[step])
            ax.scatter(backend.to_numpy(support.x)[0, :, 0], backend.to_numpy(support.y)[0, :, 0],
                       marker="^", color="k", zorder=3, label=f"{k} points used for gradient")
            ax.set_title(f"{'MAML' if name == 'maml' else 'pretrained'}, K={k}")
            ax.set_xlabel("x")
            ax.set_ylabel("y")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_curves(results: dict, path: str) -> None:
    """Paper Fig. 3: test MSE against the number of fine-tuning steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
    for ax, k in zip(axes, (5, 10, 20)):
        names = list(dict.fromkeys(key.split("/")[0] for key in results["mse"]))
        for name, color in zip(names, ("C0", "C1")):
            rows = results["mse"][f"{name}/k{k}"]
            means = numpy.array([numpy.nan if r["mean"] is None else r["mean"] for r in rows])  # nan: diverged
            cis = numpy.array([numpy.nan if r["ci95"] is None else r["ci95"] for r in rows])
            steps = numpy.arange(len(rows))
            ax.plot(steps, means, "o-", color=color, label={"maml": "MAML"}.get(name, name))
            ax.fill_between(steps, means - cis, means + cis, color=color, alpha=0.2)
        ax.set_title(f"K = {k}")
        ax.set_xlabel("number of gradient steps")
    axes[0].set_ylabel("mean squared error")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
