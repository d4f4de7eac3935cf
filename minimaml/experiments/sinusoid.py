"""Sinusoid regression (paper Sec. 5.1, App. C Table 2, Figs. 2-3).

Meta-train the 1-40-40-1 MLP with MAML on y = A sin(x - phase), K = 10 support + 10 query points,
meta-batch 25, one inner step with alpha = 0.001, Adam 1e-3; and a "pretrained" baseline: the same
network trained by plain regression on all tasks jointly. Then fine-tune both on 600 fixed test tasks
with K = 5, 10, 20 points (the same points at every step; MAML with alpha, the baseline with 0.01) and
report the MSE after 0..10 steps with 95% confidence intervals.

alpha = 0.001 is the authors' code's default, which their README's sinusoid command leaves in place;
the paper's text says 0.01. With 0.001 the full profile gives the paper's MAML row at 1, 5 and 10 steps
on three seeds, and with 0.01 it does not (docs/results.md); the pretrained row needs 0.01.

    python -m minimaml.experiments.sinusoid --profile quick     # about a minute on 2 cores
    python -m minimaml.experiments.sinusoid --profile smoke     # seconds: a check that it all runs
    python -m minimaml.experiments.sinusoid --profile full      # the paper's 70,000 iterations
    python -m minimaml.experiments.sinusoid --algorithm reptile # a follow-up instead (docs/followups.md)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import numpy

from .. import autodiff as ad
from .. import algorithms, allocator, backend, distributed, maml, optim, train
from ..nn import mlp
from ..tasks import sinusoid
from . import sinusoid_figures as figures
from .algorithm_settings import Settings, make_algorithm, overridden
from .common import (COMMAND_ERRORS, allowed_changes, cell, check_config, config_parser, exit_with_error,
                     failures_note, guarded_arithmetic, log, markdown_table, overrides_from_args, run_folder, setting,
                     summary, training_settings, write_text, write_json)

PAPER_MSE_5SHOT = {"maml": {1: 0.67, 5: 0.38, 10: 0.35}, "pretrained": {1: 2.41, 5: 2.23, 10: 2.19}}
PROFILES = ("quick", "smoke", "full")
BASELINES = {"maml": ("pretrained",)}  # the paper compares MAML with pretraining; the follow-ups stand alone


@dataclass
class Config(Settings):
    """The sinusoid experiment's settings; the algorithms' (``--algorithm``, ...) come from
    ``algorithm_settings.Settings``."""

    profile: str = setting("quick", "which profile the other values come from", training=False)
    n_iterations: int = setting(10_000, "meta-iterations (the authors' code: 70,000)", least=0, training=False)
    meta_batch_size: int = setting(25, "tasks per meta-batch", least=1)
    k_shot: int = setting(10, "support points per task in training (and as many query points)", least=1)
    inner_lr: float = setting(0.001, "inner step size alpha (training, and MAML's fine-tuning at test); the "
                              "authors' code's default (the paper's text: 0.01)", positive=True)
    inner_steps: int = setting(1, "inner steps in training", least=0)
    meta_lr: float = setting(1e-3, "Adam's step size", positive=True)
    mode: str = setting("second_order", "meta-gradient", choices=maml.MODES)
    activation: str = setting("relu", "the MLP's nonlinearity: the paper's ReLU, or tanh (smooth; iMAML's inner "
                              "problem needs it: docs/followups.md)", choices=("relu", "tanh"))
    init: str = setting("paper", "initialisation: truncated normal std 0.01 (the authors' code) or PyTorch's "
                        "uniform", choices=("paper", "uniform"))
    pretrained_lr: float = setting(0.01, "the pretrained baseline's fine-tuning step size at test", positive=True,
                                   training=False)
    n_test_tasks: int = setting(600, "test tasks", least=1, training=False)
    eval_steps: int = setting(10, "fine-tuning steps at test time (scored after each)", least=10, most=1000,
                             training=False)
    seed: int = setting(0, "initialisation and training; the test tasks use seed + 1", least=0, most=2**32 - 1)
    # the follow-ups' defaults that differ here (docs/followups.md)
    anil_inner_lr: float = overridden("anil_inner_lr", 0.1, "0.1 and 5 steps here, as learn2learn's ANIL examples: "
                                      "at alpha 0.001 a head-only step moves nothing")
    anil_inner_steps: int = overridden("anil_inner_steps", 5)
    imaml_inner_lr: float = overridden("imaml_inner_lr", 0.02)
    imaml_backtracking: bool = overridden("imaml_backtracking", True)
    imaml_inner_steps: int = overridden("imaml_inner_steps", 32)
    imaml_lambda: float = overridden("imaml_lambda", 50.0, "50 here: with the authors' 2 (or 10, 20), 32 descent "
                                     "steps leave some tasks' proximal problems unsolved early in training")
    maml_pp_learned_rates: bool = overridden("maml_pp_learned_rates", False, "Off here: Adam moves a rate by about "
                                             "--meta-lr per iteration, alpha's own size, and the learned rates "
                                             "crossed zero within 100 iterations")
    out_dir: str = setting("runs/quick/sinusoid", "output folder (checkpoints, results, figures)", training=False)
    checkpoint_every: int = setting(2_000, "iterations between checkpoints", least=1, training=False)

    @classmethod
    def for_profile(cls, profile: str = "quick", **overrides) -> "Config":
        if profile not in PROFILES:
            raise ValueError(f"sinusoid: unknown profile {profile!r}; expected one of {PROFILES}")
        algorithm = overrides.get("algorithm", "maml")
        settings = dict(profile=profile, out_dir=f"runs/{profile}/sinusoid" +
                        ("" if algorithm == "maml" else f"-{algorithm}"))
        if algorithm == "imaml":  # a smooth MLP: on the paper's ReLU one the proximal problem's descent stalls at
            settings.update(activation="tanh")  # the kinks, at 0.1-0.3 of the gradient (docs/followups.md)
        if profile == "full":
            settings.update(n_iterations=70_000)
        elif profile == "smoke":  # a check that everything runs, not a result
            settings.update(n_iterations=1_000, n_test_tasks=100)
        config = cls(**{**settings, **overrides})
        check_config(config)
        return config


def _mse_loss(prediction, target):
    return ad.mse(prediction, target)


ACTIVATIONS = {"relu": ad.relu, "tanh": ad.tanh}


def model_apply(activation: str = "relu"):
    """The 1-40-40-1 MLP's ``apply`` with ``activation`` (``Config.activation``)."""
    return functools.partial(mlp.apply, activation=ACTIVATIONS[activation])


def task_loss(activation: str = "relu"):
    """L_i: the MSE of task i's predictions, a ``task_loss(params, data) -> (T,)``."""
    return maml.supervised_loss(model_apply(activation), _mse_loss)


TASK_LOSS = task_loss()  # the paper's ReLU MLP


def meta_step(config: Config, algorithm):
    """One meta-step: the algorithm's meta-gradient of the mean query MSE over a fresh meta-batch (mean
    over tasks, as the authors' code averages; the gradient is ``meta_gradient``'s / T), its optimizer
    (MAML's: Adam)."""
    mse = task_loss(config.activation)

    def loss_and_grads(params, rng, iteration):
        tasks = sinusoid.sample_batch(rng, config.meta_batch_size, config.k_shot)  # the same on every rank
        loss, grads, metrics = algorithm.meta_gradient(mse, params, distributed.share_tasks(tasks), iteration)
        loss, grads = distributed.sum_over_ranks(loss, grads)  # the whole meta-batch's sums, on every rank
        scale = 1.0 / config.meta_batch_size
        return loss * scale, {n: g * scale for n, g in grads.items()}, metrics
    return train.GradientStep(loss_and_grads, algorithm.optimizer(config.meta_lr, config.n_iterations))


def pretrain_step(config: Config):
    """One step of the baseline: regression on all tasks jointly, the mean MSE over a batch of
    tasks' points (support and query pooled: the same data the MAML step sees)."""
    apply = model_apply(config.activation)

    def loss_and_grads(params, rng, iteration):
        tasks = sinusoid.sample_batch(rng, config.meta_batch_size, config.k_shot)
        xp = backend.array_namespace(tasks.support.x)
        x = xp.concatenate([tasks.support.x, tasks.query.x], axis=1)
        y = xp.concatenate([tasks.support.y, tasks.query.y], axis=1)
        loss, grads = ad.value_and_grad(lambda p: ad.mean(_mse_loss(apply(p, x), y)), params)
        return loss, grads, {}
    return train.GradientStep(loss_and_grads, optim.Adam(config.meta_lr))


def fine_tuning(config: Config, algorithm) -> dict:
    """How each method is fine-tuned at test: the algorithm by its own ``adaptation_steps`` (MAML: steps
    of alpha), the pretrained baseline by plain gradient descent with its own step size."""
    return {config.algorithm: algorithm, "pretrained": algorithms.make("maml", config.pretrained_lr, 1)}


def fine_tune_curve(params: dict, test_set, steps: int, algorithm, loss=TASK_LOSS) -> numpy.ndarray:
    """MSE (``loss``) on each test task's evaluation grid (its query set) after 0..steps fine-tuning steps
    on its K points (``algorithm.adaptation_steps``): an array ``(steps + 1, n_tasks)``."""
    curve = []
    tasks = test_set.tasks
    for theta in algorithm.adaptation_steps(loss, params, tasks.support, steps):
        with ad.no_grad():
            curve.append(backend.to_numpy(loss(theta, tasks.query).data))
    return numpy.stack(curve)


def run(config: Config, resume: bool = False, progress: bool = True, allow_changes=(), overwrite: bool = False) -> dict:
    """Train MAML and the pretrained baseline, evaluate both, write results and figures. ``overwrite``:
    start over in a folder that holds a run, its files moved aside (``common.run_folder``)."""
    check_config(config)
    distributed.check_ranks({"meta_batch_size": config.meta_batch_size})
    with run_folder(config.out_dir, "sinusoid", training_settings(config), resume, overwrite), guarded_arithmetic():
        return _run(config, resume, progress, allow_changes)


def _run(config: Config, resume: bool, progress: bool, allow_changes) -> dict:
    init_params = mlp.init(numpy.random.default_rng(config.seed), scheme=config.init)
    trained, histories, changes, failures = {}, {}, {}, {}
    train_seconds = 0.0  # every method's training clock, from its checkpoint: all sessions of a resumed run
    algorithm = make_algorithm(config)
    # the algorithm's own meta-parameters (step sizes, rates), if any, drawn after the network's
    meta_params = algorithm.init(init_params, numpy.random.default_rng([config.seed, 1]))
    steps = {config.algorithm: (meta_params, meta_step(config, algorithm))}
    if "pretrained" in BASELINES.get(config.algorithm, ()):
        steps["pretrained"] = (init_params, pretrain_step(config))
    for name, (first_params, step) in steps.items():
        result = train.run(first_params, step, config.n_iterations, seed=config.seed,
                           checkpoint_path=os.path.join(config.out_dir, f"{name}.ckpt.npz"),
                           checkpoint_every=config.checkpoint_every, resume=resume,
                           config=training_settings(config), allow_changes=allow_changes,
                           log_every=max(config.n_iterations // 100, 1), progress=progress, desc=name,
                           logger=log, allow_failures=config.allow_solver_failures)
        trained[name], histories[name], changes[name] = result.params, result.history, result.changes
        failures[name] = result.failures
        train_seconds += result.seconds

    evaluation, adaptation, mse = {}, fine_tuning(config, algorithm), task_loss(config.activation)
    for k in (5, 10, 20):
        test_set = sinusoid.fixed_test_tasks(config.n_test_tasks, k_shot=k, seed=config.seed + 1)
        for name, params in trained.items():
            steps = adaptation[name].test_steps(config.eval_steps)
            curve = fine_tune_curve(params, test_set, steps, adaptation[name], mse)
            evaluation[f"{name}/k{k}"] = [summary(row) for row in curve]
    results = {"config": dataclasses.asdict(config), "train_seconds": train_seconds, "mse": evaluation,
               "training_loss": {name: [(h["iteration"], h["loss"]) for h in hist]
                                 for name, hist in histories.items()},
               "changes": changes, "solver_failures": failures, "paper_mse_5shot": PAPER_MSE_5SHOT}
    write_json(os.path.join(config.out_dir, "results.json"), results)
    write_text(os.path.join(config.out_dir, "results.md"), results_markdown(results))
    if distributed.is_root() and "pretrained" in trained:  # the paper's Fig. 2: MAML beside pretraining
        figures.plot_fits(trained, adaptation, model_apply(config.activation), config,
                          os.path.join(config.out_dir, "sinusoid_fits.png"))
    if distributed.is_root():
        figures.plot_curves(results, os.path.join(config.out_dir, "sinusoid_steps.png"))
    return results


def _method(config: dict) -> str:
    """What trained: MAML's meta-gradient mode, or the follow-up (and the MLP's activation if not ReLU)."""
    algorithm = config["algorithm"]
    method = f"mode {config['mode']}" if algorithm == "maml" else f"algorithm {algorithm}"
    return method if config["activation"] == "relu" else f"{method}, {config['activation']} MLP"


def results_markdown(results: dict) -> str:
    """The App. C Table 2 comparison (5-shot) and the K = 10, 20 rows."""
    config = results["config"]
    rows = []
    names = list(dict.fromkeys(key.split("/")[0] for key in results["mse"]))
    for k in (5, 10, 20):
        for name in names:
            curve = results["mse"][f"{name}/k{k}"]
            cells = [cell(curve[s]) if s < len(curve) else "-" for s in (0, 1, 5, 10)]
            paper = (" / ".join(str(PAPER_MSE_5SHOT[name][s]) for s in (1, 5, 10))
                     if k == 5 and name in PAPER_MSE_5SHOT else "-")
            rows.append([name, k, *cells, paper])
    header = ["method", "K", "0 steps", "1 step", "5 steps", "10 steps", "paper (1 / 5 / 10)"]
    return (f"### Sinusoid regression ({config['profile']} profile: {config['n_iterations']} "
            f"meta-iterations, {_method(config)}, trained in {results['train_seconds']:.0f} s)\n\n"
            f"MSE on {config['n_test_tasks']} test tasks (mean ± 95% CI) after fine-tuning on K points "
            f"with {_step_sizes(config, names)}:\n\n" + markdown_table(header, rows)
            + _fewer_steps_note(results) + failures_note(results["solver_failures"], config["allow_solver_failures"]))


def _fewer_steps_note(results: dict) -> str:
    """A line for each method scored after fewer steps than ``eval_steps`` (``test_steps``: Meta-SGD)."""
    requested = results["config"]["eval_steps"]
    scored = {key.split("/")[0]: len(curve) - 1 for key, curve in results["mse"].items()}
    return "".join(f"\n{name} is scored after {n} step{'s' if n > 1 else ''} only: its step sizes are learned "
                   f"for the {n} it trains with, as its paper tests it (`test_steps`).\n"
                   for name, n in scored.items() if n < requested)


def _step_sizes(config: dict, names: list) -> str:
    """How the methods were fine-tuned at test."""
    algorithm = config["algorithm"]
    if algorithm == "reptile":
        return f"Reptile's inner optimizer ({config['reptile_inner_optimizer']}, {config['reptile_inner_lr']})"
    if algorithm == "meta_sgd":
        return "Meta-SGD's learned alpha"
    if algorithm == "maml_pp":
        rate = config["maml_pp_inner_lr"] or config["inner_lr"]
        return (f"MAML++'s learned per-step rates (from {rate})" if config["maml_pp_learned_rates"]
                else f"MAML++'s fixed rate {rate}")
    if algorithm == "anil":
        return f"ANIL's head steps ({config['anil_inner_lr'] or config['inner_lr']})"
    if algorithm == "imaml":
        solver = ", backtracking" if config["imaml_backtracking"] else ""
        return f"iMAML's proximal steps ({config['imaml_inner_lr']}, lambda {config['imaml_lambda']}{solver})"
    if "pretrained" in names and config["pretrained_lr"] != config["inner_lr"]:
        return f"alpha = {config['inner_lr']} (the pretrained baseline: {config['pretrained_lr']})"
    return f"alpha = {config['inner_lr']}"


def run_profile(profile: str, resume: bool = False, progress: bool = True, overwrite: bool = False) -> tuple:
    """run_all's entry: (markdown table, [output folder])."""
    config = Config.for_profile(profile)
    return results_markdown(run(config, resume=resume, progress=progress, overwrite=overwrite)), [config.out_dir]


def main(argv=None):
    parser = config_parser(Config, __doc__, {"sinusoid": Config.for_profile}, PROFILES)
    args = parser.parse_args(argv)
    try:
        config = Config.for_profile(args.profile, **overrides_from_args(Config, args))
        results = run(config, resume=args.resume, progress=not args.no_progress,
                      allow_changes=allowed_changes(args), overwrite=args.overwrite)
    except COMMAND_ERRORS as err:
        exit_with_error(parser, err)
    log(results_markdown(results))
    diverged = {key: max(row["n_diverged"] for row in rows) for key, rows in results["mse"].items()}
    diverged = {key: n for key, n in diverged.items() if n}
    if diverged:  # the results are written, the cells say "diverged"; the exit status says so too
        parser.exit(3, f"{parser.prog}: fine-tuning diverged (non-finite MSE): "
                       + ", ".join(f"{key} on {n} of {config.n_test_tasks} tasks" for key, n in diverged.items())
                       + f" (--inner-lr {config.inner_lr:g}, --pretrained-lr {config.pretrained_lr:g})\n")


if __name__ == "__main__":
    allocator.keep_freed_memory()  # big arrays reused from step to step
    main()
