"""Few-shot classification with MAML (paper Sec. 5.2, Table 1): the parts Omniglot and MiniImagenet share.

Training: each meta-iteration draws ``meta_batch_size`` N-way K-shot tasks (``q_train`` query images per
class), computes the meta-gradient over the whole meta-batch at once, and takes an Adam step.
Evaluation: on a fixed, seeded set of test tasks, fine-tune on each task's support set for
``eval_steps`` steps and report the query accuracy after each step (mean and 95% CI over tasks).
Early stopping: every ``val_every`` iterations the validation accuracy is measured and the best
parameters are kept; the test set is scored with those. A time budget (``max_train_minutes``) ends
meta-training at the first validation after the training clock has passed it.

Loss scaling, as the authors' code: the inner loss is the summed cross-entropy / K (= N x the mean),
which is the scale the paper's alpha applies to; the meta-gradient is scaled like their meta-loss
(summed query cross-entropy / (K x meta-batch)), which matters only for the gradient clipping.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy

from .. import autodiff as ad
from .. import backend, maml, optim, train
from ..nn import conv4
from ..tasks import episodes
from .common import markdown_table, mean_ci95, write_json


@dataclass
class ClassificationConfig:
    """Hyper-parameters of one few-shot classification run (defaults: Omniglot 5-way 1-shot)."""

    profile: str = "quick"
    dataset: str = "omniglot"  # or "miniimagenet"
    model: str = "conv"  # "conv" or "mlp" (Omniglot "no conv")
    n_way: int = 5
    k_shot: int = 1
    q_train: int = 15  # query images per class in training
    q_eval: int = 15  # query images per class at evaluation
    meta_batch_size: int = 32
    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_steps: int = 3
    meta_lr: float = 1e-3
    grad_clip: float = 0.0  # clip meta-gradients to [-c, c] (MiniImagenet: 10); 0 = off
    mode: str = "second_order"  # or "hvp", "first_order"
    adapt_bn_shift: bool = True
    n_iterations: int = 60_000
    val_every: int = 1_000
    n_val_tasks: int = 100
    n_test_tasks: int = 600
    eval_batch: int = 25  # test tasks adapted at once
    sample_data: bool = False  # MiniImagenet: use the 12-image-per-class sample set
    seed: int = 0
    out_dir: str = "runs/omniglot"
    checkpoint_every: int = 500
    max_train_minutes: float = 0.0  # stop at the first validation past this much training time; 0 = no limit

    @property
    def key(self) -> str:
        model = "" if self.model == "conv" else f"-{self.model}"
        order = "" if self.mode != "first_order" else "-fo"
        return f"{self.dataset}{model}-{self.n_way}way-{self.k_shot}shot{order}"


def make_config(settings: dict, overrides: dict) -> ClassificationConfig:
    """A config from a setting's values and the command line's overrides; unless given, the output
    folder is ``runs/<profile>/<setting key>``."""
    config = dataclasses.replace(ClassificationConfig(**settings), **overrides)
    if "out_dir" not in overrides:
        config = dataclasses.replace(config, out_dir=f"runs/{config.profile}/{config.key}")
    return config


def load_splits(config: ClassificationConfig) -> dict:
    """{"train", "val", "test"}: uint8 class arrays ``(C, M, H, W, ch)``."""
    if config.dataset == "omniglot":
        from ..tasks import omniglot
        return {name: split.images for name, split in omniglot.load_omniglot(seed=1).items()}
    if config.dataset == "miniimagenet":
        from ..tasks import miniimagenet
        return {name: miniimagenet.load_miniimagenet(name, sample=config.sample_data).images
                for name in ("train", "val", "test")}
    raise ValueError(f"unknown dataset {config.dataset!r}: expected 'omniglot' or 'miniimagenet'")


def make_model(config: ClassificationConfig):
    if config.model == "mlp":
        return conv4.omniglot_mlp()
    if config.dataset == "omniglot":
        return conv4.omniglot_conv4()
    return conv4.miniimagenet_conv4()


def inner_loss(n_way: int):
    """The authors' inner loss: summed cross-entropy / K = N x mean cross-entropy, per task ``(T,)``."""
    def loss(logits, labels):
        return ad.softmax_cross_entropy(logits, labels) * float(n_way)
    return loss


def accuracy(logits, labels):
    """Per-task fraction of correct argmax predictions: ``(T,)`` host array."""
    predictions = backend.to_numpy(logits.data).argmax(axis=-1)
    return (predictions == backend.to_numpy(labels)).mean(axis=-1)


def meta_step(config: ClassificationConfig, model, train_images, names):
    loss_fn = inner_loss(config.n_way)
    queries = config.n_way * config.q_train
    # ours: sum_i N mean CE_q = sum_i sum_q CE / Q; the authors': sum_i sum_q CE / (K T)
    scale = queries / (config.k_shot * config.meta_batch_size)

    def step(params, rng, iteration):
        batch = episodes.sample_episodes(train_images, config.meta_batch_size, config.n_way,
                                         config.k_shot, config.q_train, rng)
        tasks = maml.TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        loss, grads = maml.meta_gradient(model.apply, loss_fn, params, tasks, config.inner_lr,
                                         config.inner_steps, mode=config.mode, inner_param_names=names)
        return loss * scale, {n: g * scale for n, g in grads.items()}, {}
    return step


def evaluate(model, params, images, task_index, config: ClassificationConfig, names) -> numpy.ndarray:
    """Query accuracy of every task after 0..eval_steps fine-tuning steps: ``(eval_steps + 1, n_tasks)``."""
    loss_fn = inner_loss(config.n_way)
    columns = []
    for batch in episodes.iterate_batches(images, task_index, config.eval_batch):
        per_step = []
        for theta in maml.adaptation_steps(model.apply, loss_fn, params, batch.support_x,
                                           batch.support_y, config.inner_lr, config.eval_steps, names):
            with ad.no_grad():
                per_step.append(accuracy(model.apply(theta, batch.query_x), batch.query_y))
        columns.append(numpy.stack(per_step))
    return numpy.concatenate(columns, axis=1)


def run(config: ClassificationConfig, resume: bool = False, progress: bool = True) -> dict:
    """Meta-train with validation-based early stopping, then score the test tasks."""
    os.makedirs(config.out_dir, exist_ok=True)
    splits = load_splits(config)
    model = make_model(config)
    params = model.init(numpy.random.default_rng(config.seed), config.n_way)
    names = conv4.inner_param_names(params, adapt_bn_shift=config.adapt_bn_shift)
    val_tasks = episodes.fixed_tasks(splits["val"], config.n_val_tasks, config.n_way, config.k_shot,
                                     config.q_eval, seed=config.seed + 1)
    optimizer = optim.Adam(config.meta_lr, clip_value=config.grad_clip or None)
    step = meta_step(config, model, splits["train"], names)

    checkpoint = os.path.join(config.out_dir, "maml.ckpt.npz")
    best_path = os.path.join(config.out_dir, "best.npz")
    curve = _load_curve(os.path.join(config.out_dir, "validation.json")) if resume else []
    best = max(curve, key=lambda r: r["val_accuracy"]) if curve else None
    done = curve[-1]["iteration"] if curve else 0
    budget_seconds = 60 * config.max_train_minutes if config.max_train_minutes else float("inf")
    while done < config.n_iterations and (curve[-1]["seconds"] if curve else 0.0) < budget_seconds:
        target = min(done + config.val_every, config.n_iterations)
        result = train.meta_train(params, optimizer, step, target, seed=config.seed,
                                  checkpoint_path=checkpoint, checkpoint_every=config.checkpoint_every,
                                  resume=True if done else resume, log_every=max(config.val_every // 10, 1),
                                  progress=progress)
        params, done = result.params, target
        val = evaluate(model, params, splits["val"], val_tasks, config, names)[-1].mean()
        curve.append({"iteration": done, "val_accuracy": float(val), "seconds": result.seconds,
                      "train_loss": result.history[-1]["loss"] if result.history else None})
        if best is None or val >= best["val_accuracy"]:
            best = curve[-1]
            train.save_checkpoint(best_path, params, {}, done, config.seed, [])
        write_json(os.path.join(config.out_dir, "validation.json"), curve)
        print(f"iteration {done}: validation accuracy {val:.4f} (best {best['val_accuracy']:.4f} "
              f"at {best['iteration']})", flush=True)
    if done < config.n_iterations:
        print(f"stopped at iteration {done} of {config.n_iterations}: the training budget of "
              f"{config.max_train_minutes:g} minutes is spent ({curve[-1]['seconds'] / 60:.1f})", flush=True)

    best_params = train.load_checkpoint(best_path).params if os.path.exists(best_path) else params
    test_tasks = episodes.fixed_tasks(splits["test"], config.n_test_tasks, config.n_way, config.k_shot,
                                      config.q_eval, seed=config.seed + 2)
    test = evaluate(model, best_params, splits["test"], test_tasks, config, names)
    results = {"config": dataclasses.asdict(config), "key": config.key,
               "train_seconds": curve[-1]["seconds"] if curve else 0.0,
               "best_iteration": best["iteration"] if best else 0,
               "validation": curve,
               "test_accuracy": [dict(zip(("mean", "ci95"), mean_ci95(row))) for row in test]}
    write_json(os.path.join(config.out_dir, "results.json"), results)
    plot_training(results, os.path.join(config.out_dir, "training.png"))
    plot_steps(results, os.path.join(config.out_dir, "accuracy_vs_steps.png"))
    return results


def _load_curve(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def results_row(results: dict, paper: dict) -> list:
    config = results["config"]
    final = results["test_accuracy"][-1]
    steps = len(results["test_accuracy"]) - 1
    paper_value = paper.get(results["key"], "-")
    iterations_run = results["validation"][-1]["iteration"] if results["validation"] else 0
    return [results["key"], f"{100 * final['mean']:.2f} ± {100 * final['ci95']:.2f}", steps,
            paper_value, iterations_run, results["best_iteration"],
            f"{results['train_seconds'] / 60:.1f}", config["mode"]]


def results_table(all_results: list, paper: dict, title: str) -> str:
    header = ["setting", "test accuracy % (95% CI)", "eval steps", "paper", "meta-iterations",
              "best (val) at", "train minutes", "mode"]
    return f"### {title}\n\n" + markdown_table(header, [results_row(r, paper) for r in all_results])


def plot_training(results: dict, path: str) -> None:
    """Validation accuracy against meta-iterations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = results["validation"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["iteration"] for r in curve], [100 * r["val_accuracy"] for r in curve], "o-")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("validation accuracy %")
    ax.set_title(results["key"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_steps(results: dict, path: str) -> None:
    """Test accuracy against the number of fine-tuning steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["test_accuracy"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    means = numpy.array([100 * r["mean"] for r in rows])
    cis = numpy.array([100 * r["ci95"] for r in rows])
    ax.errorbar(numpy.arange(len(rows)), means, yerr=cis, fmt="o-", capsize=3)
    ax.set_xlabel("gradient steps at test time")
    ax.set_ylabel("test accuracy %")
    ax.set_title(results["key"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
