"""The meta-training loop shared by all experiments: seeding, logging, checkpoints, resume, NaN guard.

Each iteration ``i`` calls ``step_fn(params, rng, i) -> (loss, grads, metrics)`` with a generator
derived from ``(seed, i)`` alone (``numpy.random.default_rng([seed, i])``), then applies
``optimizer.update``. No random state outlives an iteration, so a run resumed from a checkpoint
takes exactly (bitwise) the steps of an uninterrupted run.

Checkpoint format (one ``.npz``, no pickle), written to a temporary file in the same folder and
then renamed over the old one, so the file on disk is always complete:

- ``param/<name>``: parameters; ``opt/<key>``: optimizer state (``opt/step``, ``opt/m/layer0.w``, ...)
- ``iteration``: the number of completed iterations; ``seed``: the run's seed
- ``history/<column>``: the logged records, one array per column (``iteration``, ``loss``, metrics)
- ``seconds``: wall-clock seconds spent in ``meta_train`` up to this checkpoint, over all the sessions
  of a resumed run (0 in checkpoints written before this entry existed)
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy
from tqdm.auto import tqdm

from minimaml import backend


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite; the message names the iteration and the parameter."""


@dataclass
class TrainResult:
    params: dict
    opt_state: dict
    history: list = field(default_factory=list)  # one dict per logged iteration
    seconds: float = 0.0  # wall-clock training time, resumed sessions included


@dataclass
class Checkpoint:
    params: dict
    opt_state: dict
    iteration: int  # completed iterations: the next one to run
    seed: int
    history: list
    seconds: float = 0.0  # wall-clock training time up to this checkpoint


def iteration_rng(seed: int, iteration: int) -> numpy.random.Generator:
    """The host generator of one iteration, a function of ``(seed, iteration)`` only."""
    return numpy.random.default_rng([seed, iteration])


def meta_train(
    params: dict,
    optimizer,
    step_fn: Callable,
    n_iterations: int,
    seed: int,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
    log_every: int = 100,
    progress: bool = True,
    logger: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Run iterations ``0 .. n_iterations - 1``: ``params, state <- optimizer.update(params, grads, state)``.

    ``step_fn(params, rng, iteration) -> (loss, grads, metrics)`` computes one meta-step: a float loss,
    a gradient dict keyed like ``params`` and a dict of float metrics (the same keys every time).
    Every ``log_every`` iterations (from iteration 0) the record ``{"iteration": i, "loss": loss,
    **metrics}`` (the values at ``params`` before update ``i``) is appended to the history, passed
    to ``logger`` and shown on the progress bar. With ``checkpoint_path``, a checkpoint is written
    every ``checkpoint_every`` iterations and at the end; ``resume=True`` continues from it when the
    file exists (its parameters replace ``params``; names and shapes must match). The checkpoint carries
    the training clock, so ``TrainResult.seconds`` counts the time of every session of a resumed run.

    A NaN or infinite loss or gradient raises ``NonFiniteError`` before the update; the last
    checkpoint on disk is left as it was.
    """
    if n_iterations < 0 or checkpoint_every < 1 or log_every < 1:
        raise ValueError(
            f"meta_train: need n_iterations >= 0, checkpoint_every >= 1 and log_every >= 1, got "
            f"{n_iterations}, {checkpoint_every} and {log_every}"
        )
    opt_state = optimizer.init(params)
    start, history, earlier_seconds = 0, [], 0.0
    if resume and checkpoint_path is not None and os.path.exists(checkpoint_path):
        ckpt = load_checkpoint(checkpoint_path)
        _check_resume(ckpt, params, seed, checkpoint_path)
        params, opt_state, start, history = ckpt.params, ckpt.opt_state, ckpt.iteration, ckpt.history
        earlier_seconds = ckpt.seconds

    clock = time.perf_counter()

    def seconds() -> float:
        return earlier_seconds + time.perf_counter() - clock

    saved_at = start
    with tqdm(total=n_iterations, initial=min(start, n_iterations), disable=not progress,
              desc="meta-train") as bar:
        for iteration in range(start, n_iterations):
            loss, grads, metrics = step_fn(params, iteration_rng(seed, iteration), iteration)
            loss = float(loss)
            _check_finite(loss, grads, iteration)
            if iteration % log_every == 0:
                record = _record(iteration, loss, metrics, history)
                history.append(record)
                bar.set_postfix({k: v for k, v in record.items() if k != "iteration"}, refresh=False)
                if logger is not None:
                    logger(record)
            params, opt_state = optimizer.update(params, grads, opt_state)
            bar.update(1)
            done = iteration + 1
            if checkpoint_path is not None and done % checkpoint_every == 0:
                save_checkpoint(checkpoint_path, params, opt_state, done, seed, history, seconds())
                saved_at = done
    if checkpoint_path is not None and saved_at != max(start, n_iterations):
        save_checkpoint(checkpoint_path, params, opt_state, n_iterations, seed, history, seconds())
    return TrainResult(params, opt_state, history, seconds())


def _check_finite(loss: float, grads: dict, iteration: int) -> None:
    if not numpy.isfinite(loss):
        raise NonFiniteError(f"iteration {iteration}: loss is {loss}")
    for key, g in grads.items():
        xp = backend.array_namespace(g)
        finite = xp.isfinite(g)
        if not bool(xp.all(finite)):
            bad = int(finite.size - int(xp.count_nonzero(finite)))
            raise NonFiniteError(
                f"iteration {iteration}: gradient of {key!r} has {bad} non-finite value(s) "
                f"out of {finite.size} (shape {tuple(g.shape)})"
            )


def _record(iteration: int, loss: float, metrics: dict, history: list) -> dict:
    """The history record of one iteration; its keys must match the earlier records'."""
    record = {"iteration": iteration, "loss": loss}
    for key, value in metrics.items():
        if key in record:
            raise ValueError(f"meta_train: metric name {key!r} is reserved")
        record[key] = float(value)
    if history and set(history[0]) != set(record):
        raise ValueError(
            f"meta_train: iteration {iteration} logs {sorted(record)}, earlier records logged "
            f"{sorted(history[0])}: step_fn must return the same metrics every iteration"
        )
    return record


def _check_resume(ckpt: Checkpoint, params: dict, seed: int, path) -> None:
    if ckpt.seed != seed:
        raise ValueError(f"resume from {path}: checkpoint was made with seed {ckpt.seed}, this run has "
                         f"seed {seed}; the resumed run would not match an uninterrupted one")
    expected = {k: tuple(v.shape) for k, v in params.items()}
    found = {k: tuple(v.shape) for k, v in ckpt.params.items()}
    if expected != found:
        raise ValueError(f"resume from {path}: checkpoint parameters {found} do not match the model's "
                         f"{expected}")


def save_checkpoint(path, params: dict, opt_state: dict, iteration: int, seed: int, history: list,
                    seconds: float = 0.0) -> None:
    """Write a checkpoint atomically: a temporary ``.npz`` in the same folder, then ``os.replace``."""
    arrays = {"iteration": numpy.asarray(iteration, dtype=numpy.int64),
              "seed": numpy.asarray(seed, dtype=numpy.int64),
              "seconds": numpy.asarray(seconds, dtype=numpy.float64)}
    arrays.update({f"param/{k}": backend.to_numpy(v) for k, v in params.items()})
    arrays.update({f"opt/{k}": backend.to_numpy(v) for k, v in opt_state.items()})
    columns = list(history[0]) if history else []
    for column in columns:
        dtype = numpy.int64 if column == "iteration" else numpy.float64
        arrays[f"history/{column}"] = numpy.asarray([r[column] for r in history], dtype=dtype)

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            numpy.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; arrays go to the default device."""
    try:
        with numpy.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    for key in ("iteration", "seed"):
        if key not in arrays:
            raise ValueError(f"checkpoint {path} has no {key!r} entry: not written by save_checkpoint")

    def section(prefix):
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    params = {k: backend.asarray(v) for k, v in section("param/").items()}
    opt_state = {k: v if k == "step" else backend.asarray(v) for k, v in section("opt/").items()}
    columns = section("history/")
    n_records = len(columns.get("iteration", ()))
    history = [{c: (int(v[i]) if c == "iteration" else float(v[i])) for c, v in columns.items()}
               for i in range(n_records)]
    seconds = float(arrays["seconds"]) if "seconds" in arrays else 0.0
    return Checkpoint(params, opt_state, int(arrays["iteration"]), int(arrays["seed"]), history, seconds)
