"""The RL experiments' figures (paper Figs. 4-5), apart from the experiments they draw: the average return
against fine-tuning steps beside the paper's, the return during training, and 2D navigation's
trajectories. ``labels``: each method's name in the legends (``rl_common.LABELS``)."""

from __future__ import annotations

import numpy as np

COLORS = {"maml": "C0", "pretrained": "C1", "random": "C2", "oracle": "C3"}


def plot_steps(results: dict, labels: dict, path: str) -> None:
    """Paper Figs. 4-5: average return against the number of gradient steps; ours solid with a 95% CI
    band, the paper's dashed, the oracle dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, rows in results["returns"].items():
        means = np.array([np.nan if r["mean"] is None else r["mean"] for r in rows])  # nan: diverged
        cis = np.array([np.nan if r["ci95"] is None else r["ci95"] for r in rows])
        x = np.arange(len(rows))
        ax.plot(x, means, "o-", color=COLORS[name], label=f"{labels[name]} (ours)")
        ax.fill_between(x, means - cis, means + cis, color=COLORS[name], alpha=0.2)
    for name, paper in results["paper"].items():
        x = np.arange(len(paper["mean"]))
        style = ":" if name == "oracle" else "x--"
        ax.plot(x, paper["mean"], style, color=COLORS[name], label=f"{labels[name]} (paper)")
    ax.set_xlabel("number of gradient steps")
    ax.set_ylabel("average return")
    ax.set_title(f"{results['config']['env']} ({results['config']['profile']})")
    ax.set_xticks(range(results["config"]["eval_steps"] + 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_training(results: dict, labels: dict, path: str) -> None:
    """Average return during training: MAML before and after its inner step, the pretrained policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, history in results["history"].items():
        if not history:
            continue
        it = [r["iteration"] for r in history]
        ax.plot(it, [r["return"] for r in history], color=COLORS[name], alpha=0.6,
                label=f"{labels[name]}" + (" (pre-update)" if name == "maml" else ""))
        if "adapted_return" in history[0]:
            ax.plot(it, [r["adapted_return"] for r in history], color=COLORS[name],
                    label=f"{labels[name]} (post-update)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("average return (training tasks)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_trajectories(shown: dict, goals, labels: dict, path: str) -> None:
    """Paper Fig. 4 (left), 2D navigation: for a few test tasks, one trajectory of each policy before and
    after 1..3 steps, the goal marked with a star. One row per method, one column per task: the tasks of
    ``shown`` (``rl_common.evaluate_policy``'s, the first chunk's), whose goals ``goals`` begins with."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(shown)
    n_shown = min(len(paths["mask"]) for name in methods for paths in shown[name])  # the first chunk's tasks
    goals = goals[:n_shown]
    fig, axes = plt.subplots(len(methods), len(goals), figsize=(3.2 * len(goals), 3.2 * len(methods)),
                             squeeze=False)
    for row, name in enumerate(methods):
        for col, goal in enumerate(goals):
            ax = axes[row, col]
            for step, paths in enumerate(shown[name]):
                n_valid = int(paths["mask"][col].sum())
                xy = paths["obs"][col, :n_valid]
                ax.plot(xy[:, 0], xy[:, 1], "-", lw=1.2, color=f"C{step}",
                        label="pre-update" if step == 0 else f"{step} grad step{'s' if step > 1 else ''}")
            ax.plot(*goal, "*", color="k", ms=14, label="goal")
            ax.plot(0, 0, "o", color="gray", ms=4)
            ax.set_xlim(-0.6, 0.6)
            ax.set_ylim(-0.6, 0.6)
            ax.set_aspect("equal")
            ax.set_title(f"{labels[name]}, test task {col}", fontsize=9)
    axes[0, 0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
