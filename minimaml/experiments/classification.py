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
import os
from dataclasses import dataclass

import numpy

from .. import autodiff as ad
from .. import backend, distributed, maml, train
from ..nn import conv4
from ..tasks import episodes
from . import classification_figures as figures
from .algorithm_settings import Settings, make_algorithm, overridden
from .common import (check_config, failures_note, guarded_arithmetic, log, markdown_table, run_folder, setting, summary,
                     training_settings, write_json)


@dataclass
class ClassificationConfig(Settings):
    """Hyper-parameters of one few-shot classification run (defaults: Omniglot 5-way 1-shot)."""

    profile: str = setting("quick", "which profile the other values come from", training=False)
    dataset: str = setting("omniglot", "the data set", choices=("omniglot", "miniimagenet"))
    model: str = setting("conv", "the 4-block conv net, or the batch-normed MLP (Omniglot 'no conv')",
                         choices=("conv", "mlp"))
    n_way: int = setting(5, "classes per task", least=2)
    k_shot: int = setting(1, "support images per class", least=1)
    q_train: int = setting(15, "query images per class in training", least=1)
    q_eval: int = setting(15, "query images per class at validation and test", least=1)
    meta_batch_size: int = setting(32, "tasks per meta-batch", least=1)
    inner_lr: float = setting(0.4, "inner step size alpha (training and fine-tuning)", positive=True)
    inner_steps: int = setting(1, "inner steps in training", least=0)
    eval_steps: int = setting(3, "fine-tuning steps at validation and test", least=0, most=1000)
    meta_lr: float = setting(1e-3, "Adam's step size", positive=True)
    grad_clip: float = setting(0.0, "clip meta-gradients to [-c, c] (MiniImagenet: 10); 0 = off", least=0.0)
    mode: str = setting("second_order", "meta-gradient", choices=maml.MODES)
    adapt_bn_shift: bool = setting(True, "adapt the batch-norm shifts in the inner loop (else meta-learned only)")
    n_iterations: int = setting(60_000, "meta-iterations", least=0, training=False)
    val_every: int = setting(1_000, "iterations between validations (early stopping)", least=1)
    n_val_tasks: int = setting(100, "validation tasks", least=1)
    n_test_tasks: int = setting(600, "test tasks", least=1, training=False)
    eval_batch: int = setting(25, "test tasks adapted at once", least=1, training=False)
    sample_data: bool = setting(False, "MiniImagenet: the 12-image-per-class sample set")
    seed: int = setting(0, "initialisation and training; validation tasks use seed + 1, test tasks seed + 2",
                        least=0, most=2**32 - 1)
    out_dir: str = setting("runs/omniglot", "output folder (checkpoints, results, figures)", training=False)
    checkpoint_every: int = setting(500, "iterations between checkpoints", least=1, training=False)
    transductive: bool = setting(True, "at validation and test, classify a task's query images in one batch (batch "
                                 "norm's statistics over all of them; the authors'); false: each with the support "
                                 "images only (Reptile's non-transductive evaluation)")
    max_train_minutes: float = setting(0.0, "stop at the first validation past this much training time; 0 = no "
                                       "limit", least=0.0, training=False)
    # the follow-ups' defaults that differ here (docs/followups.md)
    reptile_inner_lr: float = overridden("reptile_inner_lr", 1e-3, "The authors' Adam 1e-3 here")
    reptile_inner_optimizer: str = overridden("reptile_inner_optimizer", "adam")
    imaml_inner_lr: float = overridden("imaml_inner_lr", 0.1, "The authors' Omniglot command's 0.1 here")
    imaml_backtracking: bool = overridden("imaml_backtracking", True, "On here: plain descent at 0.1 cycles by "
                                          "iteration 206")
    imaml_cg_damping: float = overridden("imaml_cg_damping", 1.0, "1 and 10 here (the authors' code): the paper's "
                                         "system stalls CG at 0.04")
    imaml_lambda_damping: float = overridden("imaml_lambda_damping", 10.0)
    imaml_tolerance: float = overridden("imaml_tolerance", 0.05, "0.05 here: the conv net's ReLU and max-pool "
                                        "kinks stall the solve at 1-3 % of its start")

    @property
    def key(self) -> str:
        model = "" if self.model == "conv" else f"-{self.model}"
        order = "" if self.mode != "first_order" else "-fo"
        algorithm = "" if self.algorithm == "maml" else f"-{self.algorithm}"
        evaluation = "" if self.transductive else "-nontransductive"
        return f"{self.dataset}{model}-{self.n_way}way-{self.k_shot}shot{order}{algorithm}{evaluation}"


def make_config(settings: dict, overrides: dict) -> ClassificationConfig:
    """A config from a setting's values and the command line's overrides, checked; unless given, the
    output folder is ``runs/<profile>/<setting key>``."""
    config = dataclasses.replace(ClassificationConfig(**settings), **overrides)
    if "out_dir" not in overrides:
        config = dataclasses.replace(config, out_dir=f"runs/{config.profile}/{config.key}")
    check_config(config)
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


def download_data(config: ClassificationConfig) -> None:
    """Fetch the files of the config's data set that are missing (Omniglot: the official zips, md5-checked),
    so that ``load_splits`` finds them; raises ``DataError`` naming the URL and the folder."""
    if config.dataset == "omniglot":
        from ..tasks import omniglot
        omniglot.download_omniglot()
        return
    from ..tasks.datadir import DataError
    raise DataError(f"{config.dataset}: there is no official download; assemble it with "
                    f"`python -m minimaml.tasks.miniimagenet_assemble` (see docs/data.md)")


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


def task_loss(model, n_way: int):
    """L_i: the inner loss of the model's logits on task i's examples (``maml.supervised_loss``)."""
    return maml.supervised_loss(model.apply, inner_loss(n_way))


def accuracy(logits, labels):
    """Per-task fraction of correct argmax predictions: ``(T,)`` host array."""
    predictions = backend.to_numpy(logits.data).argmax(axis=-1)
    return (predictions == backend.to_numpy(labels)).mean(axis=-1)


def meta_step(config: ClassificationConfig, model, train_images, algorithm) -> train.GradientStep:
    """The algorithm's outer optimizer (MAML's: Adam, clipped as ``grad_clip`` says) on its meta-gradient
    of a fresh meta-batch."""
    loss = task_loss(model, config.n_way)
    queries = config.n_way * config.q_train
    # ours: sum_i N mean CE_q = sum_i sum_q CE / Q; the authors': sum_i sum_q CE / (K T)
    scale = queries / (config.k_shot * config.meta_batch_size)
    if algorithm.name == "reptile":  # its direction: a mean over the tasks
        scale = 1.0 / config.meta_batch_size

    def loss_and_grads(params, rng, iteration):
        tasks = episodes.sample_episodes(train_images, config.meta_batch_size, config.n_way,
                                         config.k_shot, config.q_train, rng)  # the same on every rank
        meta_loss, grads, metrics = algorithm.meta_gradient(loss, params, distributed.share_tasks(tasks), iteration)
        meta_loss, grads = distributed.sum_over_ranks(meta_loss, grads)  # the whole meta-batch's, on every rank
        # "loss" is the authors' scale (sum over tasks and queries / (K T)); query_ce reads as a number:
        # the mean cross-entropy of one query image after adaptation (ln N at chance)
        query_ce = meta_loss / (config.meta_batch_size * config.n_way)
        return meta_loss * scale, {n: g * scale for n, g in grads.items()}, {"query_ce": query_ce, **metrics}
    return train.GradientStep(loss_and_grads, algorithm.optimizer(config.meta_lr, config.n_iterations,
                                                                  config.grad_clip or None))


def one_query_at_a_time(model, theta: dict, params: dict, tasks, chunk: int = 16):
    """Non-transductive query logits ``(T, Q, n_way)`` (Reptile's evaluation, Nichol et al. 2018): each
    query image is classified in a batch of its task's support images and itself, so batch norm's
    statistics never see the other query images. ``theta``: the adapted parameters (a leading task axis
    where ``params``, the meta-parameters, have none); ``chunk`` query images per task per forward pass."""
    support, query = tasks.support.x, tasks.query.x
    xp = backend.array_namespace(support)
    n_tasks, n_query, n_support = query.shape[0], query.shape[1], support.shape[1]
    logits = []
    for begin in range(0, n_query, chunk):
        picked = query[:, begin:begin + chunk]  # (T, c, ...)
        c = picked.shape[1]
        batches = xp.concatenate([xp.broadcast_to(support[:, None], (n_tasks, c) + support.shape[1:]),
                                  picked[:, :, None]], axis=2)  # (T, c, S + 1, ...): support, then one query
        per_batch = {n: ad.Tensor(xp.repeat(t.data, c, axis=0)) if t.ndim > params[n].ndim else t
                     for n, t in theta.items()}  # task i's parameters for each of its c batches
        out = model.apply(per_batch, batches.reshape((n_tasks * c, n_support + 1) + support.shape[2:]))
        logits.append(out.data[:, -1].reshape(n_tasks, c, -1))
    return ad.Tensor(xp.concatenate(logits, axis=1))


def evaluate(model, params, images, task_index, config: ClassificationConfig, algorithm) -> numpy.ndarray:
    """Query accuracy of every task after 0..n fine-tuning steps, n = ``algorithm.test_steps(eval_steps)``:
    ``(n + 1, n_tasks)``.
    Under MPI each rank scores its share of the tasks and every rank gets all of them."""
    loss = task_loss(model, config.n_way)
    columns, steps = [], algorithm.test_steps(config.eval_steps)
    my_tasks = task_index[distributed.share(len(task_index))]  # under MPI, this rank's share
    for tasks in episodes.iterate_batches(images, my_tasks, config.eval_batch):
        per_step = []
        for theta in algorithm.adaptation_steps(loss, params, tasks.support, steps):
            with ad.no_grad():
                logits = (model.apply(theta, tasks.query.x) if config.transductive
                          else one_query_at_a_time(model, theta, params, tasks))
                per_step.append(accuracy(logits, tasks.query.y))
        columns.append(numpy.stack(per_step))
    return distributed.gather_tasks(numpy.concatenate(columns, axis=1), axis=1)


def run(config: ClassificationConfig, resume: bool = False, progress: bool = True, allow_changes=(),
        download: bool = False, overwrite: bool = False) -> dict:
    """Meta-train with validation-based early stopping, then score the test tasks with the
    best-validation parameters. ``download``: first fetch the data set's missing files (``download_data``);
    ``overwrite``: start over in a folder that holds a run, its files moved aside (``common.run_folder``)."""
    distributed.check_ranks({"meta_batch_size": config.meta_batch_size, "n_val_tasks": config.n_val_tasks,
                             "n_test_tasks": config.n_test_tasks})
    with run_folder(config.out_dir, config.dataset, training_settings(config), resume, overwrite), guarded_arithmetic():
        if download and distributed.is_root():
            download_data(config)
        return _run(config, resume, progress, allow_changes)


def _run(config: ClassificationConfig, resume: bool, progress: bool, allow_changes) -> dict:
    splits = load_splits(config)
    model = make_model(config)
    params = model.init(numpy.random.default_rng(config.seed), config.n_way)
    names = conv4.inner_param_names(params, adapt_bn_shift=config.adapt_bn_shift)
    algorithm = make_algorithm(config, names)
    # the algorithm's own meta-parameters (step sizes, rates, per-step rows), if any
    params = algorithm.init(params, numpy.random.default_rng([config.seed, 1]))
    val_tasks = episodes.fixed_tasks(splits["val"], config.n_val_tasks, config.n_way, config.k_shot,
                                     config.q_eval, seed=config.seed + 1)
    test_tasks = episodes.fixed_tasks(splits["test"], config.n_test_tasks, config.n_way, config.k_shot,
                                      config.q_eval, seed=config.seed + 2)

    def validation_accuracy(at_params) -> float:
        return float(evaluate(model, at_params, splits["val"], val_tasks, config, algorithm)[-1].mean())

    result = train.run(params, meta_step(config, model, splits["train"], algorithm), config.n_iterations,
                       seed=config.seed, checkpoint_path=os.path.join(config.out_dir, f"{config.algorithm}.ckpt.npz"),
                       checkpoint_every=config.checkpoint_every, resume=resume,
                       config=training_settings(config), allow_changes=allow_changes,
                       log_every=max(config.val_every // 10, 1),
                       validation=train.Validation(validation_accuracy, config.val_every),
                       max_train_seconds=60 * config.max_train_minutes or None, progress=progress,
                       desc=config.key, logger=log, allow_failures=config.allow_solver_failures)
    losses = {r["iteration"]: r["loss"] for r in result.history}
    curve = [{"iteration": r["iteration"], "val_accuracy": r["score"], "seconds": r["seconds"],
              "train_loss": losses.get(max((i for i in losses if i < r["iteration"]), default=-1))}
             for r in result.validation]
    write_json(os.path.join(config.out_dir, "validation.json"), curve)
    best_params = result.best_params if result.best_params is not None else result.params
    test = evaluate(model, best_params, splits["test"], test_tasks, config, algorithm)
    results = {"config": dataclasses.asdict(config), "key": config.key, "train_seconds": result.seconds,
               "iterations": result.iterations, "best_iteration": result.best_iteration or 0,
               "validation": curve, "changes": result.changes, "solver_failures": result.failures,
               "test_accuracy": [summary(row) for row in test]}
    write_json(os.path.join(config.out_dir, "results.json"), results)
    if distributed.is_root():
        figures.plot_training(results, os.path.join(config.out_dir, "training.png"))
        figures.plot_steps(results, os.path.join(config.out_dir, "accuracy_vs_steps.png"))
    return results


def results_row(results: dict, paper: dict) -> list:
    config = results["config"]
    final = results["test_accuracy"][-1]
    steps = len(results["test_accuracy"]) - 1
    paper_value = paper.get(results["key"], "-")
    return [results["key"], f"{100 * final['mean']:.2f} ± {100 * final['ci95']:.2f}", steps,
            paper_value, results["iterations"], results["best_iteration"],
            f"{results['train_seconds'] / 60:.1f}", config["mode"]]


def results_table(all_results: list, paper: dict, title: str) -> str:
    header = ["setting", "test accuracy % (95% CI)", "eval steps", "paper", "meta-iterations",
              "best (val) at", "train minutes", "mode"]
    return (f"### {title}\n\n" + markdown_table(header, [results_row(r, paper) for r in all_results])
            + failures_note({r["key"]: r["solver_failures"] for r in all_results},
                            any(r["config"]["allow_solver_failures"] for r in all_results)))


if __name__ == "__main__":
    from .common import not_a_command
    not_a_command("minimaml.experiments.classification",
                  "python -m minimaml.experiments.omniglot or python -m minimaml.experiments.miniimagenet")
