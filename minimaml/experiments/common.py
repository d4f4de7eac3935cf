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
import json
import math
import os
import sys

import numpy

from .. import distributed, files
from ..tasks.datadir import DataError
from ..train import NonFiniteError

# What a command reports as one line and exit status 1 (no traceback): a bad setting or resume
# (ValueError, ResumeError), a data set missing or malformed, a diverged run, a folder in use.
COMMAND_ERRORS = (ValueError, DataError, NonFiniteError, files.FolderLockedError)

PROFILES = ("quick", "full")
_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def setting(default, help: str, least=None, choices=None, training: bool = True, positive: bool = False,
            group: str | None = None):
    """A config field: ``least``: smallest allowed value; ``positive``: must be > 0; ``choices``: the
    allowed values; ``training=False``: does not shape training (e.g. the test set's size), so it may
    change at a resume; ``group``: a heading of its own in ``--help`` (listed after the others)."""
    return dataclasses.field(default=default, metadata={"help": help, "least": least, "choices": choices,
                                                         "training": training, "positive": positive,
                                                         "group": group})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(config) -> None:
    """Raise ``ValueError`` naming the flag of the first field out of its range or choices."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        least, choices = meta.get("least"), meta.get("choices")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag(f.name)} must be a finite number, got {value}")
        if least is not None and value < least:
            raise ValueError(f"{flag(f.name)} must be >= {least}, got {value}")
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
    if entry.get("n_diverged"):
        return f"diverged on {entry['n_diverged']} of {entry['n']} tasks"
    return f"{scale * entry['mean']:.{digits}f} ± {scale * entry['ci95']:.{digits}f}"


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written. Under MPI
    rank 0 alone writes (every rank holds the same results)."""
    if not distributed.is_root():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


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


def config_parser(config_class, description: str, examples: dict, profiles=PROFILES,
                  skip=()) -> argparse.ArgumentParser:
    """A command line with ``--profile``, ``--resume``, ``--allow-change``, ``--no-progress`` and one
    ``--flag`` per field of ``config_class`` (those in ``skip`` excepted), overriding the profile's
    value. ``examples``: label -> ``profile -> config``, whose values the help shows."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=profiles, default=profiles[0],
                        help=f"how much to run (default {profiles[0]}; see above)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
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
