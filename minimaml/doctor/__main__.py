"""The meta-gradient doctor's command line (docs/doctor.md).

    python -m minimaml.doctor export DIR [--case NAME ...]
    python -m minimaml.doctor check CASE GRADS
    python -m minimaml.doctor reference CASE OUT.npz

Exit status of ``check``: 0 when the gradient is exact to its precision, 1 when it is not; of every
command: 2 on bad input (a one-line message names it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy

from . import cases, diagnosis, gradients, standard

DESCRIPTION = """Check a MAML meta-gradient computed anywhere (PyTorch, JAX, your own code) against the exact
one, and when it is wrong, name the classic mistake it matches.

  1. export: write small seeded float64 cases, each a folder with case.json (what is differentiated:
     the model and the layout of every array, with the conversion to PyTorch's and JAX's layouts; the
     loss; the inner steps, rate(s) and adapted parameters; sum or mean over the tasks) and case.npz
     (the parameters and the tasks, plain arrays). Or write your own case in the same format.
  2. compute the meta-gradient of a case in your code, and save it with
     numpy.savez("grads.npz", **{name: gradient}) (names and shapes as in case.json).
  3. check: the relative error per parameter and overall, a verdict for the precision of your arrays
     (float32 or float64), and when it is wrong, the exact meta-gradient of each classic mistake
     (first order, batch-norm statistics constant or in eval mode, mean instead of sum, one step too many or too few,
     the inner rate twice or not at all, support and query swapped, no adaptation, parameters left out,
     learned rates without their term) against yours, best first.

docs/doctor.md has the whole workflow with PyTorch and JAX code."""


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(prog="python -m minimaml.doctor", description=DESCRIPTION,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parse.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the doctor's cases into DIR/<case>/ (new folders only)")
    export.add_argument("directory", metavar="DIR")
    export.add_argument("--case", action="append", choices=list(standard.STANDARD),
                        help="only this case (repeat for several; default: all)")
    checking = commands.add_parser("check", help="check a meta-gradient (GRADS, an .npz) on the case in CASE")
    checking.add_argument("case", metavar="CASE", help="a case folder (case.json + case.npz)")
    checking.add_argument("grads", metavar="GRADS", help="an .npz with one array per name of case.json")
    exact = commands.add_parser("reference", help="write the exact meta-gradient of the case in CASE to OUT "
                                "(float64; for a case of your own)")
    exact.add_argument("case", metavar="CASE")
    exact.add_argument("out", metavar="OUT", help="a new .npz file")
    return parse


def load_grads(path) -> dict:
    try:
        with numpy.load(path) as npz:
            return {n: npz[n] for n in npz.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"doctor: cannot read the gradient file {path}: {error}") from None


def write_reference(case, out: Path) -> int:
    if out.exists() or out.suffix != ".npz":
        raise ValueError(f"doctor: {out} must be a new .npz file (reference writes only new files)")
    meta_loss, grads = gradients.reference(case.astype(numpy.float64))
    numpy.savez(out, **grads)
    print(f"case {case.name}: meta-loss {meta_loss:.12g}; its exact meta-gradient written to {out}")
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "export":
            for folder in standard.export(args.directory, args.case):
                print(f"wrote {folder}/case.json and case.npz")
            return 0
        if args.command == "reference":
            return write_reference(cases.load_case(args.case), Path(args.out))
        report = diagnosis.check(cases.load_case(args.case), load_grads(args.grads))
    except (ValueError, OSError) as error:
        print(error, file=sys.stderr)
        return 2
    print(report)
    return 0 if report.exact else 1


if __name__ == "__main__":
    sys.exit(main())
