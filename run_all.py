"""Reproduce the paper at a scale that fits the machine, with one command.

    python run_all.py                      # quick: verification report, sinusoid, Omniglot, 2D navigation
    python run_all.py --profile smoke      # the same experiments in a few minutes (checks that all runs)
    python run_all.py --profile full       # the paper's scale (hours)
    python run_all.py --only sinusoid      # a subset of the experiments
    python run_all.py --only followups     # MAML's follow-ups on the sinusoid (docs/followups.md)
    python run_all.py --publish            # also refresh docs/generated/<profile>.md and docs/figures/
    python run_all.py --download           # fetch Omniglot's official zips first if they are missing

1. The verification report (``minimaml.verify``): every primitive of the tape against finite
   differences at first and second order, then the meta-gradient of each problem setting in each
   mode and the MAML-TRPO Fisher-vector product. A failure stops here with exit status 1.
2. Each experiment's ``run_profile(profile)``, each in a fresh process, so that its numbers are those
   of its own command: a process's earlier work changes the last bits of later sums (the conv passes
   hold BLAS to one thread for the rest of the process), and 2D navigation's returns with them. Each
   writes its results and figures under ``runs/<profile>/``.
3. ``runs/<profile>/report.md`` collects every experiment's table beside the paper's numbers, each
   section headed by the command, commit and date that produced it; a skipped experiment (a data set
   not supplied, an optional extra missing) says so in its place. Nothing tracked by git is written
   unless ``--publish`` is given: then the sections also go to ``docs/generated/<profile>.md``
   (replaced one experiment at a time, so a run of some experiments keeps the others' sections, and a
   skipped one says so above its earlier numbers) and the figures to ``docs/figures/``.
4. At the end: what ran, what was skipped and why, and the total time.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from minimaml import allocator, verify
from minimaml.experiments import common, locomotion, miniimagenet, navigation, omniglot, sinusoid
from minimaml.experiments import followups
from minimaml.tasks.datadir import DataError

EXPERIMENTS = {"sinusoid": sinusoid, "omniglot": omniglot, "navigation": navigation,
               "miniimagenet": miniimagenet, "locomotion": locomotion, "followups": followups}
PROFILES = ("quick", "smoke", "full")
# The quick and smoke profiles run the three experiments that fit minutes on 2 cores; MiniImagenet's quick
# profile (a smoke run on real images) and MuJoCo locomotion (an optional extra) run when named with --only;
# so do the follow-ups' sinusoid rows (``--only followups``).
DEFAULT = {"quick": ["sinusoid", "omniglot", "navigation"], "smoke": ["sinusoid", "omniglot", "navigation"],
           "full": [name for name in EXPERIMENTS if name != "followups"]}
ROOT = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join(ROOT, "docs", "generated")
FIGURES = os.path.join(ROOT, "docs", "figures")


def report_header(profile: str) -> str:
    return (f"# Results of `python run_all.py --profile {profile}`\n\n"
            f"Written by `run_all.py`; do not edit by hand (docs/results.md holds the discussion). Each "
            f"section says the command, commit and date that produced it.\n")


def commit() -> str:
    """The commit of the working tree (``+ changes`` when it differs from it), or ``unknown``."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, check=True).stdout
    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def provenance(name: str, profile: str, seconds: float | None = None) -> str:
    """The line that heads a section: the command, the commit, the date (and how long it took)."""
    took = f", {seconds / 60:.1f} minutes" if seconds is not None else ""
    return (f"_Produced by `python run_all.py --profile {profile} --only {name}` at commit {commit()} on "
            f"{datetime.date.today().isoformat()}{took}._")


def update_section(text: str, key: str, body: str) -> str:
    """Replace (or append) the section between ``<!-- begin KEY -->`` and ``<!-- end KEY -->``."""
    block = f"<!-- begin {key} -->\n{body.rstrip()}\n<!-- end {key} -->\n"
    pattern = re.compile(rf"<!-- begin {re.escape(key)} -->.*?<!-- end {re.escape(key)} -->\n", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip() + "\n\n" + block


def mark_skipped(text: str, key: str, note: str) -> str:
    """A skipped experiment's section: the note on top, the earlier numbers (if any) kept below it,
    marked as earlier."""
    pattern = re.compile(rf"<!-- begin {re.escape(key)} -->\n(.*?)<!-- end {re.escape(key)} -->\n", re.S)
    found = pattern.search(text)
    earlier = ""
    if found:
        previous = re.sub(r"^\*\*Skipped.*?\*\*\n\n(The numbers below are from an earlier run\.\n\n)?", "",
                          found.group(1), flags=re.S)
        earlier = f"The numbers below are from an earlier run.\n\n{previous}" if previous.strip() else ""
    return update_section(text, key, f"**{note}**\n\n{earlier}")


def copy_figures(out_dir: str, target: str, prefix: str) -> list:
    """Copy the experiment's PNG figures to ``target``; return their file names there."""
    os.makedirs(target, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".png"):
            copied.append(f"{prefix}-{name}")
            shutil.copyfile(os.path.join(out_dir, name), os.path.join(target, copied[-1]))
    return copied


def write_report(path: str, profile: str, key: str, body: str | None, note: str | None = None) -> None:
    """Set one experiment's section of the report at ``path`` (``body``, or the skip ``note``)."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else report_header(profile)
    text = update_section(text, key, body) if body is not None else mark_skipped(text, key, note)
    common.write_text(path, text)


def run_experiment(name: str, profile: str, resume: bool, progress: bool, options: dict) -> tuple:
    """``EXPERIMENTS[name].run_profile(...)`` in a fresh process (the experiment's own command's state).
    Leaving early (Ctrl-C) terminates that process too, wherever the interrupt found it."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, initializer=allocator.keep_freed_memory) as pool:  # on leaving: pool.terminate()
        return pool.apply(_run_profile, (name, profile, resume, progress, options))


def _run_profile(name: str, profile: str, resume: bool, progress: bool, options: dict) -> tuple:
    return EXPERIMENTS[name].run_profile(profile, resume=resume, progress=progress, **options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated experiments out of {', '.join(EXPERIMENTS)} (default: quick and "
                             f"smoke {', '.join(DEFAULT['quick'])}; full: all)")
    parser.add_argument("--resume", action="store_true", help="continue each experiment from its checkpoints")
    parser.add_argument("--overwrite", action="store_true",
                        help="start each experiment over: the earlier run's files are moved into "
                             "<its folder>/replaced-<date>/, never deleted")
    parser.add_argument("--publish", action="store_true",
                        help="also write docs/generated/<profile>.md and docs/figures/ (tracked files)")
    parser.add_argument("--download", action="store_true",
                        help="download Omniglot's official zips (md5-checked) when MINIMAML_DATA lacks them")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    names = DEFAULT[args.profile] if args.only is None else [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiments {unknown}: choose from {list(EXPERIMENTS)}")
    if args.resume and args.overwrite:
        parser.error("--resume continues the earlier runs and --overwrite moves them aside: give one")
    started = time.time()

    print("== verification report ==")
    primitives_ok = verify.report()
    print()
    if not (verify.meta_gradient_report() and primitives_ok):
        print("derivative checks failed: not running the experiments", file=sys.stderr)
        return 1

    report = os.path.join(ROOT, "runs", args.profile, "report.md")
    published = os.path.join(GENERATED, f"{args.profile}.md")
    outcomes = []
    for name in names:
        print(f"\n== {name} ({args.profile} profile) ==", flush=True)
        start = time.time()
        key = f"{name}/{args.profile}"
        options = {"overwrite": args.overwrite}
        if name == "omniglot":  # the one data set with a download
            options["download"] = args.download
        try:
            table, folders = run_experiment(name, args.profile, args.resume, not args.no_progress, options)
        except KeyboardInterrupt:
            interrupted = (f"Interrupted (Ctrl-C) in the run of {datetime.date.today().isoformat()}; --resume "
                           f"continues it")
            print(f"\n{name}: interrupted", flush=True)
            outcomes.append((name, "interrupted", "Ctrl-C; python run_all.py --resume continues it"))
            for path in (report,) + ((published,) if args.publish else ()):
                write_report(path, args.profile, key, None, interrupted)
            break
        except (ImportError, *common.COMMAND_ERRORS) as err:
            # an optional extra (MuJoCo) or a data set not supplied: skipped; anything else: failed
            outcome = "skipped" if isinstance(err, (ImportError, DataError)) else "failed"
            line = common.error_line(err)
            note = (f"{outcome.capitalize()} in the run of {datetime.date.today().isoformat()} (commit {commit()}): "
                    f"{line}")
            print(f"{name}: {outcome}: {line}", flush=True)
            outcomes.append((name, outcome, line))
            for path in (report,) + ((published,) if args.publish else ()):
                write_report(path, args.profile, key, None, note)
            continue
        seconds = time.time() - start
        print(table)
        print(f"{name}: {seconds:.0f} s", flush=True)
        outcomes.append((name, "ran", f"{seconds / 60:.1f} minutes"))
        for path, figures in ((report, os.path.join(os.path.dirname(report), "figures")),
                              *(((published, FIGURES),) if args.publish else ())):
            names_there = [f for folder in folders
                           for f in copy_figures(folder, figures, f"{args.profile}-{os.path.basename(folder)}")]
            links = "\n".join(f"![{f}]({os.path.relpath(figures, os.path.dirname(path))}/{f})" for f in names_there)
            write_report(path, args.profile, key, f"{provenance(name, args.profile, seconds)}\n\n{table}\n{links}\n")

    print(f"\n== summary ({args.profile} profile) ==")
    for name, outcome, detail in outcomes:
        print(f"{name:14s} {outcome:11s} {detail}")
    not_run = names[len(outcomes):]
    if not_run:
        print(f"{'not run':14s} {', '.join(not_run)}")
    print(f"total {(time.time() - started) / 60:.1f} minutes (verification report included)")
    print(f"wrote {os.path.relpath(report, ROOT)}" + (f" and {os.path.relpath(published, ROOT)}" if args.publish else
                                                       " (add --publish to refresh docs/generated/)"))
    if any(outcome == "interrupted" for _, outcome, _ in outcomes):
        return 130
    return 1 if any(outcome == "failed" for _, outcome, _ in outcomes) else 0


def interrupt_on_sigterm() -> None:
    """Take SIGTERM (``kill``, a job scheduler's stop) as Ctrl-C: the experiment's process is terminated
    with run_all, not left running on its own, and the summary and report say "interrupted"."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    allocator.keep_freed_memory()  # big arrays reused from step to step
    interrupt_on_sigterm()
    sys.exit(main())
