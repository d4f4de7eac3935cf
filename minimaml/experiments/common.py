"""What every experiment shares: profiles, confidence intervals, atomic result files, markdown tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile

import numpy

PROFILES = ("quick", "full")
_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def mean_ci95(values) -> tuple:
    """Mean and 95% confidence half-width 1.96 sd / sqrt(n) (the paper's evaluation)."""
    values = numpy.asarray(values, dtype=numpy.float64)
    return float(values.mean()), float(1.96 * values.std() / numpy.sqrt(len(values)))


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def config_parser(config_class, description: str, profiles=PROFILES) -> argparse.ArgumentParser:
    """A command line with ``--profile``, ``--resume``, ``--no-progress`` and one ``--flag`` per field of
    the config dataclass (overriding the profile's value)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=profiles, default=profiles[0],
                        help="how much to run: see the module's docstring")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for field in dataclasses.fields(config_class):
        if field.name == "profile":
            continue
        kind = _FIELD_TYPES.get(field.type, field.type)  # annotations are strings under __future__
        flag = "--" + field.name.replace("_", "-")
        help_text = f"(default from the profile; dataclass default {field.default!r})"
        if kind is bool:
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                                metavar="BOOL", help=help_text)
        elif kind in (int, float, str):
            parser.add_argument(flag, type=kind, default=None, help=help_text)
    return parser


def overrides_from_args(config_class, args) -> dict:
    """The config fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
            if f.name != "profile" and getattr(args, f.name, None) is not None}


def config_from_args(config_class, args) -> object:
    """The profile's config with the command line's overrides applied."""
    return dataclasses.replace(config_class.for_profile(args.profile),
                               **overrides_from_args(config_class, args))
