"""Sinusoid regression (paper Sec. 5.1, App. C Table 2, Figs. 2-3).

Meta-train the 1-40-40-1 MLP with MAML on y = A sin(x - phase), K = 10 support + 10 query points,
meta-batch 25, one inner step with alpha = 0.01, Adam 1e-3; and a "pretrained" baseline: the same
network trained by plain regression on all tasks jointly. Then fine-tune both on 600 fixed test tasks
with K = 5, 10, 20 points (the same points at every step, alpha = 0.01) and report the MSE after
0..10 steps with 95% confidence intervals.

    python -m minimaml.experiments.sinusoid --profile quick     # about a minute on 2 cores
    python -m minimaml.experiments.sinusoid --profile full      # the paper's 70,000 iterations
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import numpy

from .. import autodiff as ad
from .. import allocator, backend, maml, optim, train
from ..nn import mlp
from ..tasks import sinusoid
from .common import config_from_args, config_parser, markdown_table, mean_ci95, write_atomic, write_json

PAPER_MSE_5SHOT = {"maml": {1: 0.67, 5: 0.38, 10: 0.35}, "pretrained": {1: 2.41, 5: 2.23, 10: 2.19}}


@dataclass
class Config:
    profile: str = "quick"
    n_iterations: int = 10_000  # meta-iterations (the authors' code: 70,000)
    meta_batch_size: int = 25
    k_shot: int = 10  # support = query size in training
    inner_lr: float = 0.01
    inner_steps: int = 1
    meta_lr: float = 1e-3
    mode: str = "second_order"  # or "hvp", "first_order"
    init: str = "paper"  # truncated normal std 0.01 (authors' code) or "uniform"
    n_test_tasks: int = 600
    eval_steps: int = 10
    seed: int = 0
    out_dir: str = "runs/quick/sinusoid"
    checkpoint_every: int = 2_000

    @classmethod
    def for_profile(cls, profile: str) -> "Config":
        if profile == "full":
            return cls(profile="full", n_iterations=70_000, out_dir="runs/full/sinusoid")
        return cls(profile="quick", out_dir="runs/quick/sinusoid")


def _mse_loss(prediction, target):
    return ad.mse(prediction, target)


def maml_step(config: Config):
    """One MAML meta-step: the meta-gradient of the mean query MSE over a fresh meta-batch
    (mean over tasks, as the authors' code averages; the gradient is ``meta_gradient``'s / T)."""
    def step(params, rng, iteration):
        batch = sinusoid.sample_batch(rng, config.meta_batch_size, config.k_shot)
        tasks = maml.TaskBatch(*batch)
        loss, grads = maml.meta_gradient(mlp.apply, _mse_loss, params, tasks, config.inner_lr,
                                         config.inner_steps, mode=config.mode)
        scale = 1.0 / config.meta_batch_size
        return loss * scale, {n: g * scale for n, g in grads.items()}, {}
    return step


def pretrain_step(config: Config):
    """One step of the baseline: regression on all tasks jointly, the mean MSE over a batch of
    tasks' points (support and query pooled: the same data the MAML step sees)."""
    def step(params, rng, iteration):
        batch = sinusoid.sample_batch(rng, config.meta_batch_size, config.k_shot)
        xp = backend.array_namespace(batch.support_x)
        x = xp.concatenate([batch.support_x, batch.query_x], axis=1)
        y = xp.concatenate([batch.support_y, batch.query_y], axis=1)
        leaves = {n: ad.Tensor(p, requires_grad=True) for n, p in params.items()}
        loss = ad.mean(_mse_loss(mlp.apply(leaves, x), y))
        grads = ad.grad(loss, list(leaves.values()))
        return float(loss.data), {n: g.data for n, g in zip(leaves, grads)}, {}
    return step


def fine_tune_curve(params: dict, test_set, inner_lr: float, steps: int) -> numpy.ndarray:
    """MSE on each test task's evaluation grid after 0..steps fine-tuning steps on its K points:
    an array ``(steps + 1, n_tasks)``."""
    curve = []
    for theta in maml.adaptation_steps(mlp.apply, _mse_loss, params, test_set.support_x,
                                       test_set.support_y, inner_lr, steps):
        with ad.no_grad():
            curve.append(backend.to_numpy(_mse_loss(mlp.apply(theta, test_set.eval_x), test_set.eval_y).data))
    return numpy.stack(curve)


def _train(name: str, step_fn, params, config: Config, resume: bool, progress: bool):
    checkpoint = os.path.join(config.out_dir, f"{name}.ckpt.npz")
    result = train.meta_train(params, optim.Adam(config.meta_lr), step_fn, config.n_iterations,
                              seed=config.seed, checkpoint_path=checkpoint,
                              checkpoint_every=config.checkpoint_every, resume=resume,
                              log_every=max(config.n_iterations // 100, 1), progress=progress)
    return result


def run(config: Config, resume: bool = False, progress: bool = True) -> dict:
    """Train MAML and the pretrained baseline, evaluate both, write results and figures."""
    os.makedirs(config.out_dir, exist_ok=True)
    start = time.time()
    init_params = mlp.init(numpy.random.default_rng(config.seed), scheme=config.init)
    trained, histories = {}, {}
    for name, step in (("maml", maml_step(config)), ("pretrained", pretrain_step(config))):
        result = _train(name, step, init_params, config, resume, progress)
        trained[name], histories[name] = result.params, result.history
    train_seconds = time.time() - start

    evaluation = {}
    for k in (5, 10, 20):
        test_set = sinusoid.fixed_test_tasks(config.n_test_tasks, k_shot=k, seed=config.seed + 1)
        for name, params in trained.items():
            curve = fine_tune_curve(params, test_set, config.inner_lr, config.eval_steps)
            evaluation[f"{name}/k{k}"] = [mean_ci95(row) for row in curve]
    results = {"config": dataclasses.asdict(config), "train_seconds": train_seconds,
               "mse": {key: [{"mean": m, "ci95": c} for m, c in rows] for key, rows in evaluation.items()},
               "training_loss": {name: [(h["iteration"], h["loss"]) for h in hist]
                                 for name, hist in histories.items()},
               "paper_mse_5shot": PAPER_MSE_5SHOT}
    write_json(os.path.join(config.out_dir, "results.json"), results)
    write_atomic(os.path.join(config.out_dir, "results.md"), results_markdown(results))
    plot_fits(trained, config, os.path.join(config.out_dir, "sinusoid_fits.png"))
    plot_curves(results, os.path.join(config.out_dir, "sinusoid_steps.png"))
    return results


def results_markdown(results: dict) -> str:
    """The App. C Table 2 comparison (5-shot) and the K = 10, 20 rows."""
    config = results["config"]
    rows = []
    for k in (5, 10, 20):
        for name in ("maml", "pretrained"):
            cells = [f"{results['mse'][f'{name}/k{k}'][s]['mean']:.3f} ± {results['mse'][f'{name}/k{k}'][s]['ci95']:.3f}"
                     for s in (0, 1, 5, 10)]
            paper = " / ".join(str(PAPER_MSE_5SHOT[name][s]) for s in (1, 5, 10)) if k == 5 else "-"
            rows.append([name, k, *cells, paper])
    header = ["method", "K", "0 steps", "1 step", "5 steps", "10 steps", "paper (1 / 5 / 10)"]
    return (f"### Sinusoid regression ({config['profile']} profile: {config['n_iterations']} "
            f"meta-iterations, mode {config['mode']}, trained in {results['train_seconds']:.0f} s)\n\n"
            f"MSE on {config['n_test_tasks']} test tasks (mean ± 95% CI) after fine-tuning on K points "
            f"with alpha = {config['inner_lr']}:\n\n" + markdown_table(header, rows))


def plot_fits(trained: dict, config: Config, path: str) -> None:
    """Paper Fig. 2: a test task's true curve, its K points, and each model after 1 and 10 steps."""
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
            for step, theta in enumerate(maml.adaptation_steps(mlp.apply, _mse_loss, params,
                                                               test_set.support_x, test_set.support_y,
                                                               config.inner_lr, 10)):
                if step in (0, 1, 10):
                    with ad.no_grad():
                        y = backend.to_numpy(mlp.apply(theta, x).data)[0, :, 0]
                    ax.plot(grid, y, {0: ":", 1: "--", 10: "-"}[step], color="C0" if step else "C2",
                            label={0: "before update", 1: "after 1 grad step", 10: "after 10 grad steps"}[step])
            ax.scatter(backend.to_numpy(test_set.support_x)[0, :, 0], backend.to_numpy(test_set.support_y)[0, :, 0],
                       marker="^", color="k", zorder=3, label=f"{k} points used for gradient")
            ax.set_title(f"{'MAML' if name == 'maml' else 'pretrained'}, K={k}")
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
        for name, color in (("maml", "C0"), ("pretrained", "C1")):
            rows = results["mse"][f"{name}/k{k}"]
            means = numpy.array([r["mean"] for r in rows])
            cis = numpy.array([r["ci95"] for r in rows])
            steps = numpy.arange(len(rows))
            ax.plot(steps, means, "o-", color=color, label="MAML" if name == "maml" else "pretrained")
            ax.fill_between(steps, means - cis, means + cis, color=color, alpha=0.2)
        ax.set_title(f"K = {k}")
        ax.set_xlabel("number of gradient steps")
    axes[0].set_ylabel("mean squared error")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_profile(profile: str, resume: bool = False, progress: bool = True) -> tuple:
    """run_all's entry: (markdown table, [output folder])."""
    config = Config.for_profile(profile)
    return results_markdown(run(config, resume=resume, progress=progress)), [config.out_dir]


def main(argv=None):
    parser = config_parser(Config, __doc__)
    args = parser.parse_args(argv)
    config = config_from_args(Config, args)
    results = run(config, resume=args.resume, progress=not args.no_progress)
    print(results_markdown(results))


if __name__ == "__main__":
    allocator.keep_freed_memory()  # big arrays reused from step to step
    main()
