"""The follow-ups' rows of ``run_all.py --only followups``: the sinusoid experiment (5-shot MSE after 1, 5
and 10 steps) for each follow-up at the profile's budget, one table. (Omniglot's follow-up rows are
``python -m minimaml.experiments.omniglot --algorithm NAME``, minutes each: docs/followups.md.)"""

from __future__ import annotations

from . import sinusoid
from .common import cell, markdown_table
from ..train import NonFiniteError, SolverError

FOLLOWUPS = ("reptile", "meta_sgd", "maml_pp", "anil", "imaml")


def run_profile(profile: str, resume: bool = False, progress: bool = True, overwrite: bool = False) -> tuple:
    """(markdown table, [output folders]): MAML and each follow-up on the sinusoid, the profile's budget;
    a run that diverges, or whose solver fails (``train.SolverError``), gets a row that says so in one
    line, and the others still run."""
    rows, folders = [], []
    for name in ("maml",) + FOLLOWUPS:
        # MAML in a folder of its own: runs/<profile>/sinusoid is the sinusoid experiment's
        folder = {"out_dir": f"runs/{profile}/sinusoid-maml"} if name == "maml" else {}
        config = sinusoid.Config.for_profile(profile, algorithm=name, **folder)
        folders.append(config.out_dir)
        try:
            results = sinusoid.run(config, resume=resume, progress=progress, overwrite=overwrite)
        except (NonFiniteError, SolverError) as err:
            what = "training diverged" if isinstance(err, NonFiniteError) else "its solver failed"
            rows.append([name, f"{what} ({str(err).split('. ')[0]})", "-", "-", "-", "-"])
            continue
        curve = results["mse"][f"{name}/k5"]
        cells = [cell(curve[s]) if s < len(curve) else "- (scored at its training steps)" for s in (1, 5, 10)]
        failed = results["solver_failures"][name]["iterations"]
        rows.append([name, *cells, f"{results['train_seconds']:.0f}", failed])
    header = ["algorithm", "1 step", "5 steps", "10 steps", "train seconds (with evaluation)",
              "iterations whose solver failed (never 3 in a row)"]
    return (f"### Sinusoid 5-shot, MAML's follow-ups ({profile} profile)\n\n"
            f"MSE on the test tasks (mean ± 95% CI):\n\n" + markdown_table(header, rows)), folders
