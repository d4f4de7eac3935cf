"""What every experiment shares: settings with help and checks, the command line, confidence
intervals, atomic result files, markdown tables.

An experiment's settings are one dataclass whose fields are declared with ``setting(default, help,
...)``: the help text, the least value of a count, the allowed choices, and whether the field shapes
training (and so must match a checkpoint's on ``--resume``). ``config_parser`` turns them into
``--flags`` whose help shows the value every profile actually uses; ``check_config`` rejects a bad
value, naming its flag, before any work is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager

import numpy

from .. import distributed, files
from ..tasks.datadir import DataError
from ..train import NonFiniteError, SolverError

# What a command reports as one line and exit status 1 (no traceback): a bad setting or resume
# (ValueError, ResumeError, RunFolderError), a data set missing or malformed, a diverged run or a solver
# that failed, a folder in use.
# Out of memory and file errors (a full disk, a folder that cannot be written) are one line too.
COMMAND_ERRORS = (ValueError, DataError, NonFiniteError, SolverError, files.FolderLockedError, MemoryError,
                  OSError)

PROFILES = ("quick", "full")
_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def setting(default, help: str, least=None, choices=None, training: bool = True, positive: bool = False,
            group: str | None = None, most=None, at_most: str | None = None):
    """A config field: ``least`` / ``most``: smallest / largest allowed value; ``positive``: must be > 0;
    ``at_most``: the name of another field this one may not exceed; ``choices``: the allowed values;
    ``training=False``: does not shape training (e.g. the test set's size), so it may change at a resume;
    ``group``: a heading of its own in ``--help`` (listed after the others)."""
    return dataclasses.field(default=default, metadata={"help": help, "least": least, "choices": choices,
                                                         "training": training, "positive": positive,
                                                         "group": group, "most": most, "at_most": at_most})


INT64_MAX = 2**63 - 1  # what a checkpoint stores a count or a seed in


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(config) -> None:
    """Raise ``ValueError`` naming the flag of the first field out of its range or choices."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        least, most, choices = meta.get("least"), meta.get("most"), meta.get("choices")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag(f.name)} must be a finite number, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            raise ValueError(f"{flag(f.name)} must fit a 64-bit integer (at most {INT64_MAX}), got {value}")
        if least is not None and value < least:
            raise ValueError(f"{flag(f.name)} must be >= {least}, got {value}")
        if most is not None and value > most:
            raise ValueError(f"{flag(f.name)} must be <= {most}, got {value}")
        if meta.get("at_most") and value > getattr(config, meta["at_most"]):
            raise ValueError(f"{flag(f.name)} ({value}) must not exceed {flag(meta['at_most'])} "
                             f"({getattr(config, meta['at_most'])})")
        if meta.get("positive") and not value > 0:
            raise ValueError(f"{flag(f.name)} must be positive, got {value}")
        if choices is not None and value not in choices:
            raise ValueError(f"{flag(f.name)} must be one of {', '.join(map(str, choices))}; got {value!r}")


def training_settings(config) -> dict:
    """The fields that shape training (stored in checkpoints, compared on resume)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("training", True)}


def mean_ci95(values) -> tuple:
    """Mean and 95% confidence half-width 1.96 sd / sqrt(n) (the paper's evaluation)."""
    values = numpy.asarray(values, dtype=numpy.float64)
    return float(values.mean()), float(1.96 * values.std() / numpy.sqrt(len(values)))


def summary(values) -> dict:
    """``{"mean", "ci95", "n", "n_diverged"}`` of per-task values; the tasks whose value is NaN or
    infinite (fine-tuning diverged) are counted, and then mean and ci95 are None, not NaN."""
    values = numpy.asarray(values, dtype=numpy.float64)
    diverged = int((~numpy.isfinite(values)).sum())
    mean, ci95 = mean_ci95(values) if not diverged else (None, None)
    return {"mean": mean, "ci95": ci95, "n": int(values.size), "n_diverged": diverged}


def cell(entry: dict, scale: float = 1.0, digits: int = 3) -> str:
    """A table cell for a ``summary``: ``mean ± ci95``, or ``diverged on k of n tasks``."""
    if entry["n_diverged"]:
        return f"diverged on {entry['n_diverged']} of {entry['n']} tasks"
    return f"{scale * entry['mean']:.{digits}f} ± {scale * entry['ci95']:.{digits}f}"


# --- the output folder of a run --------------------------------------------------------------------
RUN_RECORD = "run.json"  # what a run's folder holds: the experiment and the settings that shape training
RUN_FILES = (RUN_RECORD, "results.json", "results.md", "validation.json", "*.ckpt.npz", "*.png")  # what runs write


@contextmanager
def guarded_arithmetic():
    """NumPy's overflow, invalid-value and divide-by-zero warnings off for a run: what they would say,
    the run's guards say in one line each (``train.run`` stops on a non-finite loss or gradient, naming
    the setting to change; an evaluation counts and reports the tasks whose fine-tuning diverged)."""
    with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
        yield


class RunFolderError(ValueError):
    """The output folder cannot take this run: it holds another run (or files a run would overwrite), it is
    not a folder, or it cannot be written. The message names the folder and the way forward."""


@contextmanager
def run_folder(out_dir: str, experiment: str, settings: dict, resume: bool = False, overwrite: bool = False):
    """Hold ``out_dir`` for one run (``distributed.root_lock``: one run per folder), after checking that
    the run may write there, so that nothing it did not create is overwritten:

    - a fresh run refuses a folder that holds a run (or any file a run writes: ``RUN_FILES``), naming
      ``--resume`` and ``--overwrite``;
    - ``overwrite``: those files are moved, not deleted, into ``<out_dir>/replaced-<date>T<time>/``;
    - ``resume``: the folder's run must be the same experiment and algorithm (``run.json``; ``train.run``
      checks the other settings against the checkpoint); a folder without a run starts one.
    ``settings``: what shapes training (``training_settings``); written to ``<out_dir>/run.json``."""
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in --out-dir and --overwrite moves it aside: give one")
    _check_folder(out_dir)
    with distributed.root_lock(out_dir, one_line=COMMAND_ERRORS):
        if distributed.is_root():
            _claim(out_dir, experiment, json.loads(json.dumps(settings)), resume, overwrite)
        yield


def _check_folder(out_dir: str) -> None:
    if not out_dir or not str(out_dir).strip():
        raise RunFolderError("--out-dir is empty; name a folder for the run's checkpoints and results")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RunFolderError(f"--out-dir {out_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out-dir {out_dir}: {existing} is not writable; give another --out-dir")


def _claim(out_dir: str, experiment: str, settings: dict, resume: bool, overwrite: bool) -> None:
    found = sorted({os.path.basename(p) for pattern in RUN_FILES
                    for p in glob.glob(os.path.join(glob.escape(out_dir), pattern))})
    record_path = os.path.join(out_dir, RUN_RECORD)
    if found and overwrite:
        aside = os.path.join(out_dir, "replaced-" + datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S"))
        while os.path.exists(aside):  # two in one second
            aside += "+"
        os.makedirs(aside)
        for name in found:
            shutil.move(os.path.join(out_dir, name), os.path.join(aside, name))
        log(f"moved the earlier run's {len(found)} files in {out_dir} to {aside}/")
    elif found and not resume:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise RunFolderError(
            f"--out-dir {out_dir} already holds a run ({shown}); --resume continues it, --overwrite moves its "
            f"files aside (into {out_dir}/replaced-<date>/) and starts over, or give another --out-dir")
    elif found and os.path.exists(record_path):
        _check_same_run(record_path, experiment, settings)
    write_json(record_path, {"experiment": experiment, "settings": settings})


def _check_same_run(record_path: str, experiment: str, settings: dict) -> None:
    """Resume only the run the folder holds: the same experiment and algorithm (another algorithm's
    checkpoints have other names, so ``train.run`` would not see the difference and would start over
    beside the earlier run's results). The other settings ``train.run`` checks against the checkpoint."""
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        held, held_algorithm = record["experiment"], record["settings"].get("algorithm", "maml")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise RunFolderError(f"{record_path}: unreadable ({err}); move it away to resume the run without this "
                             f"check") from None
    folder = os.path.dirname(record_path)
    if held != experiment:
        raise RunFolderError(f"--resume: {folder} holds a {held} run, not {experiment}; give another --out-dir")
    if held_algorithm != settings.get("algorithm", "maml"):
        raise RunFolderError(f"--resume: {folder} holds a run of --algorithm {held_algorithm}, this run has "
                             f"--algorithm {settings.get('algorithm', 'maml')}; another algorithm is another run: "
                             f"give another --out-dir")


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` by the one atomic writer, ``files.write_atomic`` (never half-written),
    its folder made if need be. Under MPI rank 0 alone writes (every rank holds the same results)."""
    if not distributed.is_root():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def failures_note(by_run: dict, allowed: bool) -> str:
    """What a results table says under it when some iterations' solvers failed and training went on
    (``train.TrainResult.failures`` by method or setting: fewer than 3 in a row, or any with
    ``allowed``, ``--allow-solver-failures``): how many iterations failed, and the first failure. Empty
    when none did."""
    lines = [f"- {name}: {f['iterations']} iteration(s); the first: {f['first']}"
             for name, f in by_run.items() if f["iterations"]]
    if not lines:
        return ""
    why = "allowed by --allow-solver-failures" if allowed else "never 3 iterations in a row, where training stops"
    return (f"\n**Solver failures ({why}): the numbers above may be wrong.**\n\n" + "\n".join(lines) + "\n")


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


def profile_values(name: str, examples: dict, profiles) -> str:
    """``quick: 10, full: 70000`` for field ``name``, over the profiles of each example config
    (``examples``: label -> ``profile -> config``); one group per label when they differ."""
    groups = {}
    for label, make in examples.items():
        values = ", ".join(f"{p}: {_shown(getattr(make(p), name))}" for p in profiles)
        groups.setdefault(values, []).append(label)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{' / '.join(labels)}: {values}" for values, labels in groups.items())


class CommandParser(argparse.ArgumentParser):
    """argparse, except that a negative number in exponent form after a flag (``--meta-lr -1e-3``) is
    that flag's value, as ``--meta-lr -0.001`` is: argparse would take the word for an unknown option and
    say "expected one argument" instead of the range check naming the flag."""

    def parse_known_args(self, args=None, namespace=None):
        words = list(sys.argv[1:] if args is None else args)
        joined = []
        for word in words:
            action = self._option_string_actions.get(joined[-1]) if joined else None
            if action is not None and action.nargs is None and word.startswith("-") and _is_number(word):
                joined[-1] = f"{joined[-1]}={word}"
            else:
                joined.append(word)
        return super().parse_known_args(joined, namespace)


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def exit_with_error(parser: argparse.ArgumentParser, err: BaseException, status: int = 1) -> None:
    """End a command with ``status`` and the error's one line (``error_line``); under MPI every rank
    meets the same error, and rank 0 alone prints it."""
    if distributed.is_root():
        parser.exit(status, f"{parser.prog}: error: {error_line(err)}\n")
    sys.exit(status)


def error_line(err: BaseException) -> str:
    """The one line a command prints for an error a user caused (``COMMAND_ERRORS``, memory, files)."""
    if isinstance(err, MemoryError):
        return (f"out of memory ({err or 'an array could not be allocated'}); lower the sizes, e.g. "
                f"--meta-batch-size, --n-test-tasks, --eval-batch")
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return str(err)


def config_parser(config_class, description: str, examples: dict, profiles=PROFILES,
                  skip=()) -> argparse.ArgumentParser:
    """A command line with ``--profile``, ``--resume``, ``--overwrite``, ``--allow-change``, ``--no-progress`` and one
    ``--flag`` per field of ``config_class`` (those in ``skip`` excepted), overriding the profile's
    value. ``examples``: label -> ``profile -> config``, whose values the help shows."""
    parser = CommandParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=profiles, default=profiles[0],
                        help=f"how much to run (default {profiles[0]}; see above)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --out-dir that holds a run: its files are moved into "
                             "<out-dir>/replaced-<date>/, never deleted")
    parser.add_argument("--allow-change", default="", metavar="SETTINGS",
                        help="with --resume: comma-separated settings (e.g. meta_lr) that may differ from the "
                             "checkpoint's; the change is recorded in the run's history")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    fields = [f for f in dataclasses.fields(config_class) if f.name != "profile" and f.name not in skip]
    groups = {}
    for f in fields:
        heading = f.metadata.get("group")
        if heading is not None and heading not in groups:
            groups[heading] = parser.add_argument_group(heading)
        section = parser if heading is None else groups[heading]
        kind = _FIELD_TYPES.get(f.type, f.type)  # annotations are strings under __future__
        help_text = f"{f.metadata.get('help', '')} [{profile_values(f.name, examples, profiles)}]"
        help_text = help_text.replace("%", "%%")
        if kind is bool:
            section.add_argument(flag(f.name), type=_boolean, nargs="?", const=True, default=None, metavar="BOOL",
                                 help=help_text)
        else:
            section.add_argument(flag(f.name), type=kind, default=None, help=help_text,
                                 choices=f.metadata.get("choices"))
    return parser


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def overrides_from_args(config_class, args) -> dict:
    """The config fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
            if f.name != "profile" and getattr(args, f.name, None) is not None}


def allowed_changes(args) -> tuple:
    return tuple(name.strip().replace("-", "_") for name in args.allow_change.split(",") if name.strip())


def log(line: str) -> None:
    """A log line, flushed at once (so a background run's log file is up to date); under MPI, rank 0's."""
    if distributed.is_root():
        print(line, flush=True)


def not_a_command(module: str, commands: str) -> None:
    """For library modules run as ``python -m``: say what to run instead, exit with status 2."""
    print(f"{module} is a library module, not a command; run {commands}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    not_a_command("minimaml.experiments.common", "python -m minimaml.experiments.<sinusoid|omniglot|"
                  "miniimagenet|navigation|locomotion> --help")
