"""Reproduce the paper at a scale that fits the machine, with one command.

    python run_all.py                      # quick: derivative report, sinusoid, Omniglot, 2D navigation
    python run_all.py --profile full       # the paper's scale (hours)
    python run_all.py --only sinusoid      # a subset of the experiments

1. The derivative verification report (``minimaml.verify``): every primitive of the tape against
   finite differences at first and second order, then the meta-gradient of each problem setting in each
   mode and the MAML-TRPO Fisher-vector product. A failure stops here with exit status 1.
2. Each experiment's ``run_profile(profile)``; each writes its results and figures under
   ``runs/<profile>/``.
3. ``docs/results.md`` collects every experiment's table beside the paper's numbers, and its figures
   are copied to ``docs/figures/``. Each (experiment, profile) section is replaced on its own, so a
   quick run keeps the full-profile sections written earlier.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time

from minimaml import allocator, verify
from minimaml.experiments import common, locomotion, miniimagenet, navigation, omniglot, sinusoid
from minimaml.tasks.datadir import DataError

EXPERIMENTS = {"sinusoid": sinusoid, "omniglot": omniglot, "navigation": navigation,
               "miniimagenet": miniimagenet, "locomotion": locomotion}
# The quick profile runs the three experiments that fit minutes on 2 cores; MiniImagenet's quick profile
# (a smoke run on real images) and MuJoCo locomotion (an optional extra) run when named with --only.
DEFAULT = {"quick": ["sinusoid", "omniglot", "navigation"], "full": list(EXPERIMENTS)}
ROOT = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(ROOT, "docs", "results.md")
FIGURES = os.path.join(ROOT, "docs", "figures")

RESULTS_HEADER = """# Results

Written by `python run_all.py` (each section by the profile named in its title). Every number here was
measured by this repository's code; the paper's numbers stand beside them for comparison.
"""


def update_section(text: str, key: str, body: str) -> str:
    """Replace (or append) the section between ``<!-- begin KEY -->`` and ``<!-- end KEY -->``."""
    block = f"<!-- begin {key} -->\n{body.rstrip()}\n<!-- end {key} -->\n"
    pattern = re.compile(rf"<!-- begin {re.escape(key)} -->.*?<!-- end {re.escape(key)} -->\n", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip() + "\n\n" + block


def publish_figures(out_dir: str, prefix: str) -> list:
    """Copy the experiment's PNG figures to docs/figures; return their paths relative to docs/."""
    os.makedirs(FIGURES, exist_ok=True)
    published = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".png"):
            target = f"{prefix}-{name}"
            shutil.copyfile(os.path.join(out_dir, name), os.path.join(FIGURES, target))
            published.append(f"figures/{target}")
    return published


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=common.PROFILES, default="quick")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated experiments out of {', '.join(EXPERIMENTS)} (default: quick "
                             f"{', '.join(DEFAULT['quick'])}; full: all)")
    parser.add_argument("--resume", action="store_true", help="continue each experiment from its checkpoints")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    names = DEFAULT[args.profile] if args.only is None else [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiments {unknown}: choose from {list(EXPERIMENTS)}")

    print("== derivative verification report ==")
    primitives_ok = verify.report()
    print()
    if not (verify.meta_gradient_report() and primitives_ok):
        print("derivative checks failed: not running the experiments", file=sys.stderr)
        return 1

    text = open(RESULTS, encoding="utf-8").read() if os.path.exists(RESULTS) else RESULTS_HEADER
    for name in names:
        print(f"\n== {name} ({args.profile} profile) ==", flush=True)
        start = time.time()
        try:
            table, folders = EXPERIMENTS[name].run_profile(args.profile, resume=args.resume,
                                                           progress=not args.no_progress)
        except (ImportError, DataError) as err:  # an optional extra (MuJoCo) or a dataset not supplied
            print(f"{name}: skipped: {err}", flush=True)
            continue
        print(table)
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
        figures = [f for folder in folders
                   for f in publish_figures(folder, f"{args.profile}-{os.path.basename(folder)}")]
        body = table + "\n" + "\n".join(f"![{os.path.basename(f)}]({f})" for f in figures) + "\n"
        text = update_section(text, f"{name}/{args.profile}", body)
        common.write_atomic(RESULTS, text)
    common.write_atomic(RESULTS, text)
    print(f"\nwrote {os.path.relpath(RESULTS, ROOT)}")
    return 0


if __name__ == "__main__":
    allocator.keep_freed_memory()  # big arrays reused from step to step
    sys.exit(main())
