"""The one training loop of every experiment: seeding, the clock, checkpoints, resume, the NaN/inf
guard, progress, validation and early stopping.

What an iteration does is a ``Step``: ``step(params, state, rng, iteration) -> (params, state, record)``.
A record may carry ``record["failure"]``, a line saying that this step's numerics failed (a solver that did
not converge); the loop acts on a persistent failure as on NaN. Two kinds plug in:

- ``GradientStep``: Adam or SGD on a meta-gradient (sinusoid, Omniglot, MiniImagenet, and every
  supervised baseline);
- a TRPO step (``experiments.rl_common``: MAML-TRPO and the pretrained RL baseline).

Iteration ``i`` gets the generator ``numpy.random.default_rng([seed, i])`` and nothing else random
outlives it, so a run resumed from a checkpoint takes exactly (bitwise) the steps of an uninterrupted one.

Checkpoint format (one ``.npz``, no pickle), written to a temporary file in the same folder and
then renamed over the old one, so the file on disk is always complete:

- ``param/<name>``: parameters; ``opt/<key>``: the step's state (Adam's ``opt/step``, ``opt/m/layer0.w``, ...)
- ``iteration``: the number of completed iterations; ``seed``: the run's seed
- ``history/<column>``: the logged records, one array per column (``iteration``, ``seconds``, ``loss``, ...)
- ``seconds``: training seconds (steps only, validation excluded) over all the sessions of a resumed run
- ``config``: the settings that shape training, as JSON, checked on resume; ``changes``: the settings
  changed on purpose at a resume (JSON list of ``{"iteration", "setting", "from", "to"}``)
- with validation: ``validation/<column>`` (``iteration``, ``score``, ``seconds``) and the best-scoring
  parameters ``best/<name>`` with ``best_iteration``

Guarantees, each tested: a NaN or infinite loss, gradient or parameter stops the run with
``NonFiniteError`` and leaves on disk the last checkpoint whose parameters gave a finite loss; a step
that reports a failure ``failure_patience`` iterations in a row stops it the same way with
``SolverError`` (or, with ``allow_failures``, goes on and counts them in ``TrainResult.failures``); a
resume with other settings is a ``ResumeError`` naming them. (The experiments hold their folder with
``files.folder_lock``: one run per folder.)

Under MPI (``minimaml.distributed``) every rank runs this loop with the same generators; the step
all-reduces its meta-gradient, rank 0 alone writes checkpoints and shows progress, a resume reads
rank 0's checkpoint on every rank, and rank 0's clock decides when a time budget is spent.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy
from tqdm.auto import tqdm

from minimaml import backend, distributed
from minimaml.files import write_atomic


class NonFiniteError(FloatingPointError):
    """A loss, gradient or parameter was NaN or infinite; the message names the iteration and says
    what the checkpoint on disk holds."""


class SolverError(FloatingPointError):
    """A step's numerics failed (an inner solve or conjugate gradient that did not converge, a learned
    step size that went non-positive) ``failure_patience`` iterations in a row: the message is the step's
    own, naming the setting to change, and says what the checkpoint on disk holds."""


class ResumeError(ValueError):
    """A checkpoint does not fit the run that would resume from it (seed, model, settings)."""


@dataclass
class Checkpoint:
    params: dict
    opt_state: dict
    iteration: int  # completed iterations: the next one to run
    seed: int
    history: list
    seconds: float = 0.0  # training seconds up to this checkpoint
    config: dict | None = None  # None in checkpoints written before settings were stored
    changes: list = field(default_factory=list)
    validation: list = field(default_factory=list)
    best_params: dict | None = None
    best_iteration: int | None = None


def _no_failures() -> dict:
    """``TrainResult.failures`` before any: how many iterations failed, the first and the last message."""
    return {"iterations": 0, "first": None, "last": None}


@dataclass
class TrainResult:
    params: dict  # after the last iteration
    opt_state: dict
    history: list = field(default_factory=list)  # one dict per logged iteration
    seconds: float = 0.0  # training seconds, resumed sessions included
    iterations: int = 0  # iterations completed (fewer than asked when a time budget stopped the run)
    validation: list = field(default_factory=list)  # one dict per validation: iteration, score, seconds
    best_params: dict | None = None  # the best-scoring parameters (with validation), else None
    best_iteration: int | None = None
    changes: list = field(default_factory=list)
    failures: dict = field(default_factory=_no_failures)


def iteration_rng(seed: int, iteration: int) -> numpy.random.Generator:
    """The host generator of one iteration, a function of ``(seed, iteration)`` only."""
    return numpy.random.default_rng([seed, iteration])


# --- what one iteration does ---------------------------------------------------------------------
class Step:
    """One training iteration: ``step(params, state, rng, iteration) -> (params, state, record)``,
    ``record`` a dict of float metrics (the same keys every time). ``init(params)`` is the state
    before the first iteration (here: none)."""

    def init(self, params: dict) -> dict:
        return {}

    def __call__(self, params: dict, state: dict, rng, iteration: int) -> tuple:
        raise NotImplementedError


class GradientStep(Step):
    """An optimizer (``optim.Adam``, ``optim.SGD``) on a gradient:
    ``loss_and_grads(params, rng, iteration) -> (loss, grads, metrics)``, then
    ``params, state <- optimizer.update(params, grads, state)``. The record is ``{"loss", **metrics}``,
    at ``params`` before the update (``metrics["failure"]``, a str, passes through as the record's). A
    non-finite loss or gradient raises before the update."""

    def __init__(self, loss_and_grads: Callable, optimizer):
        self.loss_and_grads, self.optimizer = loss_and_grads, optimizer

    def init(self, params: dict) -> dict:
        return self.optimizer.init(params)

    def __call__(self, params, state, rng, iteration):
        loss, grads, metrics = self.loss_and_grads(params, rng, iteration)
        loss = float(loss)
        if not math.isfinite(loss):
            raise NonFiniteError(f"iteration {iteration}: loss is {loss}")
        _check_finite_arrays("gradient", grads, iteration)
        params, state = self.optimizer.update(params, grads, state)
        record = {"loss": loss, **{k: float(v) for k, v in metrics.items() if k != "failure"}}
        if metrics.get("failure"):
            record["failure"] = str(metrics["failure"])
        return params, state, record


@dataclass
class LastGood:
    """What a checkpoint falls back to when a step fails: the state before the last step whose loss was
    finite (and whose numerics did not fail), with how much of the history and validation curve it had."""

    iteration: int
    params: dict
    state: dict
    n_history: int
    n_curve: int
    best_params: dict | None
    best_iteration: int | None
    seconds: float


@dataclass
class Validation:
    """Early stopping: every ``every`` iterations (counted from 0, so first after ``every``),
    ``score(params) -> float`` (higher is better); the best-scoring parameters are kept."""

    score: Callable
    every: int


# --- the loop --------------------------------------------------------------------------------------
def run(
    params: dict,
    step: Step,
    n_iterations: int,
    seed: int,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
    config: dict | None = None,
    allow_changes=(),
    log_every: int = 1,
    validation: Validation | None = None,
    max_train_seconds: float | None = None,
    progress: bool = True,
    desc: str = "train",
    logger: Callable[[str], None] | None = None,
    failure_patience: int = 3,
    allow_failures: bool = False,
) -> TrainResult:
    """Run iterations ``0 .. n_iterations - 1`` of ``step`` from ``params``.

    Every ``log_every`` iterations (from iteration 0) the record ``{"iteration": i, "seconds": s,
    **record}`` (``s``: the step's seconds) joins the history and the progress bar. With
    ``checkpoint_path``, a checkpoint is written every ``checkpoint_every`` iterations, after each
    validation and at the end; ``resume=True`` continues from it when the file exists. ``config`` (a
    JSON-serialisable dict of the settings that shape training) is stored there; resuming with other
    values is a ``ResumeError`` naming them, unless they are in ``allow_changes`` (then the change is
    recorded in ``TrainResult.changes``). A longer ``n_iterations`` continues a finished run.

    ``validation``: scored every ``validation.every`` iterations; ``max_train_seconds``: meta-training
    stops at the first validation past that many training seconds. ``logger(line)`` gets a line per
    validation, and per checkpoint when there is no progress bar.

    A non-finite loss, record value or parameter raises ``NonFiniteError``; the checkpoint on disk is
    then the last one whose parameters gave a finite loss. A record's ``failure`` in ``failure_patience``
    iterations in a row raises ``SolverError`` the same way (the checkpoint: the parameters before the
    last failing step); ``allow_failures``: a warning line instead, once per run of failing iterations.
    Either way the failures are counted in ``TrainResult.failures`` (iterations, first and last message).
    """
    _check_counts(n_iterations=(n_iterations, 0), checkpoint_every=(checkpoint_every, 1),
                  log_every=(log_every, 1), failure_patience=(failure_patience, 1),
                  **({"validation.every": (validation.every, 1)} if validation else {}))
    if max_train_seconds is not None and not max_train_seconds > 0:
        raise ValueError(f"train.run: max_train_seconds must be positive or None, got {max_train_seconds}")
    config = None if config is None else json.loads(json.dumps(config))  # what the checkpoint will hold
    state = step.init(params)
    start, history, earlier_seconds, changes = 0, [], 0.0, []
    curve, best_params, best_iteration = [], None, None
    if resume and checkpoint_path is not None and distributed.broadcast(os.path.exists(checkpoint_path)):
        ckpt = distributed.broadcast(load_checkpoint(checkpoint_path) if distributed.is_root() else None)
        changes = _check_resume(ckpt, params, seed, config, allow_changes, n_iterations, checkpoint_path)
        params, state, start, history = ckpt.params, ckpt.opt_state, ckpt.iteration, ckpt.history
        earlier_seconds, curve = ckpt.seconds, ckpt.validation
        best_params, best_iteration = ckpt.best_params, ckpt.best_iteration
    say = logger or (lambda line: None)
    step_seconds = 0.0  # this session's, validation excluded

    def seconds() -> float:
        return earlier_seconds + step_seconds

    def save(path, done, at_params, at_state, at_history, at_curve, at_best, at_best_iteration, at_seconds):
        save_checkpoint(path, at_params, at_state, done, seed, at_history, at_seconds, config=config,
                        changes=changes, validation=at_curve, best_params=at_best,
                        best_iteration=at_best_iteration)

    budget_spent = bool(max_train_seconds and curve and curve[-1]["iteration"] == start
                        and curve[-1]["seconds"] >= max_train_seconds)
    # The state before the last step whose loss was finite: what the checkpoint falls back to.
    good = None
    saved_at = start
    failures, failing_in_a_row = _no_failures(), 0
    iteration = start
    progress = progress and distributed.is_root()  # under MPI, rank 0 shows the bar and writes the checkpoints
    with tqdm(total=n_iterations, initial=min(start, n_iterations), disable=not progress, desc=desc) as bar:
        while iteration < n_iterations and not budget_spent:
            clock = time.perf_counter()
            try:
                new_params, new_state, record = step(params, state, iteration_rng(seed, iteration), iteration)
                failure = record.pop("failure", None)
                _check_finite_record(record, iteration)
                failing_in_a_row = failing_in_a_row + 1 if failure else 0
                if failure:
                    failures = _counted(failures, f"iteration {iteration}: {failure}")
                    in_a_row = f"{failing_in_a_row} iterations in a row"
                    if failing_in_a_row >= failure_patience and not allow_failures:
                        raise SolverError(f"iteration {iteration}: {failure} ({in_a_row})")
                    if failing_in_a_row == failure_patience:
                        say(f"{desc} warning: iteration {iteration}: {failure} ({in_a_row}; going on, as failures "
                            f"are allowed)")
            except (NonFiniteError, SolverError) as err:
                if good is not None and saved_at == iteration:  # the checkpoint holds the failing parameters
                    save(checkpoint_path, good.iteration, good.params, good.state, history[:good.n_history],
                         curve[:good.n_curve], good.best_params, good.best_iteration, good.seconds)
                    saved_at = good.iteration
                raise _stop_error(err, saved_at, iteration, checkpoint_path, resumed_bad=good is None) from None
            if checkpoint_path is not None:
                good = LastGood(iteration, params, state, len(history), len(curve), best_params, best_iteration,
                                seconds())
            try:
                _check_finite_arrays("parameter", new_params, iteration)
            except NonFiniteError as err:
                raise _stop_error(err, saved_at, iteration, checkpoint_path, resumed_bad=False) from None
            step_time = time.perf_counter() - clock
            step_seconds += step_time
            params, state = new_params, new_state
            if iteration % log_every == 0:
                entry = _record(iteration, step_time, record, history)
                history.append(entry)
                bar.set_postfix({k: round(v, 4) for k, v in entry.items() if k != "iteration"}, refresh=False)
            bar.update(1)
            iteration += 1
            validated = False
            if validation is not None and iteration % validation.every == 0:
                score = float(validation.score(params))
                validated = True
                curve.append({"iteration": iteration, "score": score, "seconds": seconds()})
                if best_iteration is None or score >= _best_score(curve, best_iteration):
                    best_params, best_iteration = params, iteration
                say(f"{desc} iteration {iteration}: validation {score:.4f} (best "
                    f"{_best_score(curve, best_iteration):.4f} at {best_iteration})")
                # rank 0's clock decides for every rank (the ranks must stop at the same iteration)
                budget_spent = distributed.broadcast(bool(max_train_seconds and seconds() >= max_train_seconds))
            if checkpoint_path is not None and (iteration % checkpoint_every == 0 or validated):
                save(checkpoint_path, iteration, params, state, history, curve, best_params, best_iteration,
                     seconds())
                saved_at = iteration
                if not progress and history:
                    say(f"{desc} {iteration}/{n_iterations}: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in history[-1].items() if k != "iteration"))
    if checkpoint_path is not None and saved_at != iteration:
        save(checkpoint_path, iteration, params, state, history, curve, best_params, best_iteration, seconds())
    if budget_spent and iteration < n_iterations:
        say(f"{desc}: stopped at iteration {iteration} of {n_iterations}: the training budget of "
            f"{max_train_seconds / 60:g} minutes is spent ({seconds() / 60:.1f})")
    return TrainResult(params, state, history, seconds(), iteration, curve, best_params, best_iteration, changes,
                       failures)


def _counted(failures: dict, line: str) -> dict:
    """``failures`` with one more failing iteration, ``line`` saying which and why."""
    return {"iterations": failures["iterations"] + 1, "first": failures["first"] or line, "last": line}


def _best_score(curve: list, best_iteration: int) -> float:
    return next(r["score"] for r in reversed(curve) if r["iteration"] == best_iteration)


def _stop_error(err, saved_at: int, iteration: int, checkpoint_path, resumed_bad: bool):
    """The error to raise (``NonFiniteError`` or ``SolverError``, as ``err``): what failed, what the
    checkpoint on disk holds and how to go on. ``resumed_bad``: the failing parameters are the ones this
    session resumed from."""
    kind = type(err)
    if checkpoint_path is None:
        return kind(f"{err}; no checkpoint is kept")
    if not os.path.exists(checkpoint_path):
        return kind(f"{err}; no checkpoint was written before it")
    if resumed_bad and saved_at == iteration:
        held = f"iteration {saved_at}, the parameters this run resumed from, which gave it"
    elif kind is SolverError:
        held = f"iteration {saved_at}, from before the last failing steps"
    else:
        held = f"iteration {saved_at}, whose parameters gave a finite loss"
    what = ("change what failed (the setting named above), or pass --allow-solver-failures to go on with a "
            "warning" if kind is SolverError else "change what diverged (e.g. a smaller --meta-lr or --inner-lr)")
    return kind(f"{err}. The checkpoint {checkpoint_path} holds {held}. To go on, {what}, and resume with "
                f"--resume --allow-change SETTING (the change is recorded in the run's history)")


def _check_counts(**counts) -> None:
    for name, (value, least) in counts.items():
        if isinstance(value, bool) or int(value) != value or value < least:
            raise ValueError(f"train.run: {name} must be an integer >= {least}, got {value!r}")


def _check_finite_record(record: dict, iteration: int) -> None:
    for key, value in record.items():
        if not math.isfinite(float(value)):
            raise NonFiniteError(f"iteration {iteration}: {key} is {value}")


def _check_finite_arrays(kind: str, arrays: dict, iteration: int) -> None:
    """Raise ``NonFiniteError`` naming the first array with a NaN or infinite entry. One reduction over
    all of them first, so that on a GPU a healthy step costs one device sync, not one per array."""
    if not arrays:
        return
    xp = backend.array_namespace(next(iter(arrays.values())))
    if bool(xp.all(xp.stack([xp.all(xp.isfinite(a)) for a in arrays.values()]))):
        return
    for key, a in arrays.items():
        finite = xp.isfinite(a)
        if not bool(xp.all(finite)):
            bad = int(finite.size - int(xp.count_nonzero(finite)))
            raise NonFiniteError(f"iteration {iteration}: {kind} {key!r} has {bad} non-finite value(s) "
                                 f"out of {finite.size} (shape {tuple(a.shape)})")


def _record(iteration: int, seconds: float, record: dict, history: list) -> dict:
    """The history entry of one iteration; its keys must match the earlier entries' (a history resumed
    from a checkpoint of an older version, with fewer columns, keeps its columns)."""
    entry = {"iteration": iteration, "seconds": seconds}
    for key, value in record.items():
        if key in entry:
            raise ValueError(f"train.run: record name {key!r} is reserved")
        entry[key] = float(value)
    if history and set(history[0]) < set(entry):  # resumed from an older version's history: its columns
        entry = {k: entry[k] for k in history[0]}
    if history and set(history[0]) != set(entry):
        raise ValueError(
            f"train.run: iteration {iteration} logs {sorted(entry)}, earlier records logged "
            f"{sorted(history[0])}: the step must return the same metrics every iteration"
        )
    return entry


def _check_resume(ckpt: Checkpoint, params: dict, seed: int, config, allow_changes, n_iterations, path) -> list:
    """Raise ``ResumeError`` unless the checkpoint fits this run; return the run's list of deliberate
    changes, the new ones appended."""
    if ckpt.seed != seed:
        raise ResumeError(f"resume from {path}: checkpoint was made with seed {ckpt.seed}, this run has "
                          f"seed {seed}; the resumed run would not match an uninterrupted one")
    expected = {k: tuple(v.shape) for k, v in params.items()}
    found = {k: tuple(v.shape) for k, v in ckpt.params.items()}
    if expected != found:
        raise ResumeError(f"resume from {path}: checkpoint parameters {found} do not match the model's "
                          f"{expected}")
    if ckpt.iteration > n_iterations:
        raise ResumeError(f"resume from {path}: the checkpoint has done {ckpt.iteration} iterations, more "
                          f"than the {n_iterations} asked for; ask for at least {ckpt.iteration} (or use "
                          f"another output folder)")
    changes = list(ckpt.changes)
    if config is None or ckpt.config is None:
        return changes
    differ = sorted(k for k in set(config) | set(ckpt.config) if config.get(k) != ckpt.config.get(k))
    refused = [k for k in differ if k not in set(allow_changes)]
    if refused:
        described = "; ".join(f"{k}: {ckpt.config.get(k)!r} in the checkpoint, {config.get(k)!r} now"
                              for k in refused)
        raise ResumeError(f"resume from {path}: settings that shape training differ ({described}). Use the "
                          f"checkpoint's values, another output folder, or allow the change on purpose "
                          f"with --allow-change {','.join(refused)}")
    changes += [{"iteration": ckpt.iteration, "setting": k, "from": ckpt.config.get(k), "to": config.get(k)}
                for k in differ]
    return changes


# --- checkpoints -----------------------------------------------------------------------------------
def save_checkpoint(path, params: dict, opt_state: dict, iteration: int, seed: int, history: list,
                    seconds: float = 0.0, config: dict | None = None, changes=(), validation=(),
                    best_params: dict | None = None, best_iteration: int | None = None) -> None:
    """Write a checkpoint atomically: a temporary ``.npz`` in the same folder, then ``os.replace``.
    Under MPI rank 0 alone writes (every rank holds the same parameters)."""
    if not distributed.is_root():
        return
    arrays = {"iteration": numpy.asarray(iteration, dtype=numpy.int64),
              "seed": numpy.asarray(seed, dtype=numpy.int64),
              "seconds": numpy.asarray(seconds, dtype=numpy.float64)}
    arrays.update({f"param/{k}": backend.to_numpy(v) for k, v in params.items()})
    arrays.update({f"opt/{k}": backend.to_numpy(v) for k, v in opt_state.items()})
    arrays.update(_columns("history/", history))
    if config is not None:
        arrays["config"] = numpy.asarray(json.dumps(config, sort_keys=True))
        arrays["changes"] = numpy.asarray(json.dumps(list(changes)))
    if validation:
        arrays.update(_columns("validation/", validation))
    if best_params is not None:
        arrays.update({f"best/{k}": backend.to_numpy(v) for k, v in best_params.items()})
        arrays["best_iteration"] = numpy.asarray(best_iteration, dtype=numpy.int64)
    write_atomic(path, lambda f: numpy.savez(f, **arrays))


def _columns(prefix: str, records: list) -> dict:
    columns = list(records[0]) if records else []
    return {f"{prefix}{c}": numpy.asarray([r[c] for r in records],
                                          dtype=numpy.int64 if c == "iteration" else numpy.float64)
            for c in columns}


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; arrays go to the default device."""
    try:
        with numpy.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as err:  # noqa: BLE001 - truncated or flipped bytes fail anywhere in zipfile / numpy
        raise ValueError(f"cannot read checkpoint {path}: it is damaged ({type(err).__name__}: {err}); move it "
                         f"away to start over, or resume from a copy") from None
    for key in ("iteration", "seed"):
        if key not in arrays:
            raise ValueError(f"checkpoint {path} has no {key!r} entry: not written by save_checkpoint")

    def section(prefix):
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    def records(prefix):
        columns = section(prefix)
        n = len(columns.get("iteration", ()))
        return [{c: (int(v[i]) if c == "iteration" else float(v[i])) for c, v in columns.items()} for i in range(n)]

    params = {k: backend.asarray(v) for k, v in section("param/").items()}
    opt_state = {k: v if k == "step" else backend.asarray(v) for k, v in section("opt/").items()}
    best = section("best/")
    return Checkpoint(
        params, opt_state, int(arrays["iteration"]), int(arrays["seed"]), records("history/"),
        seconds=float(arrays["seconds"]) if "seconds" in arrays else 0.0,
        config=json.loads(str(arrays["config"])) if "config" in arrays else None,
        changes=json.loads(str(arrays["changes"])) if "changes" in arrays else [],
        validation=records("validation/"),
        best_params={k: backend.asarray(v) for k, v in best.items()} if best else None,
        best_iteration=int(arrays["best_iteration"]) if "best_iteration" in arrays else None)
