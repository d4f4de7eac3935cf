"""run_all.py: the report goes to runs/<profile>/report.md with each section's command, commit and date;
a skipped experiment says so where its numbers would be; nothing tracked is written without --publish;
the summary says what ran and what was skipped."""

import importlib.util
import os
import time

import pytest

from minimaml.tasks.datadir import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_all(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_all", os.path.join(ROOT, "run_all.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", str(tmp_path))
    monkeypatch.setattr(module, "GENERATED", str(tmp_path / "docs" / "generated"))
    monkeypatch.setattr(module, "FIGURES", str(tmp_path / "docs" / "figures"))
    monkeypatch.setattr(module.verify, "report", lambda: True)
    monkeypatch.setattr(module.verify, "meta_gradient_report", lambda: True)
    monkeypatch.setattr(module, "commit", lambda: "abc1234")
    # in this process, so that the fakes below stand in (test_each_experiment_runs_in_a_fresh_process: the real one)
    monkeypatch.setattr(module, "run_experiment", module._run_profile)
    outcome = {"data": True}

    class Ran:
        @staticmethod
        def run_profile(profile, resume=False, progress=True, overwrite=False):
            if outcome.get("raise"):
                raise outcome["raise"]
            folder = tmp_path / "out"
            folder.mkdir(exist_ok=True)
            (folder / "curve.png").write_bytes(b"png")
            return f"### ran ({profile})\n\n| a | b |\n|---|---|\n| 1 | 2 |\n", [str(folder)]

    class NeedsData:
        @staticmethod
        def run_profile(profile, resume=False, progress=True, download=False, overwrite=False):
            outcome["download"] = download
            if not outcome["data"]:
                raise DataError("no Omniglot in /nowhere (set MINIMAML_DATA)")
            return f"### data ({profile})\n\n| accuracy |\n|---|\n| 0.9 |\n", []

    monkeypatch.setattr(module, "EXPERIMENTS", {"sinusoid": Ran, "omniglot": NeedsData})
    module.outcome = outcome
    return module


def test_the_report_names_command_commit_and_date_and_touches_no_tracked_file(run_all, tmp_path, capsys):
    assert run_all.main(["--only", "sinusoid,omniglot", "--no-progress"]) == 0
    report = (tmp_path / "runs" / "quick" / "report.md").read_text()
    assert "_Produced by `python run_all.py --profile quick --only sinusoid` at commit abc1234 on" in report
    assert "| 1 | 2 |" in report and "![quick-out-curve.png](figures/quick-out-curve.png)" in report
    assert (tmp_path / "runs" / "quick" / "figures" / "quick-out-curve.png").exists()
    assert not (tmp_path / "docs").exists()  # nothing tracked without --publish
    assert run_all.outcome["download"] is False
    assert run_all.main(["--only", "omniglot", "--download", "--no-progress"]) == 0
    assert run_all.outcome["download"] is True  # --download reaches the Omniglot experiment
    out = capsys.readouterr().out
    assert "sinusoid       ran" in out and "omniglot       ran" in out and "total" in out


def test_a_skip_says_why_where_the_numbers_would_be_and_keeps_the_earlier_ones_marked(run_all, tmp_path, capsys):
    assert run_all.main(["--only", "omniglot", "--publish", "--no-progress"]) == 0
    run_all.outcome["data"] = False
    assert run_all.main(["--only", "omniglot", "--publish", "--no-progress"]) == 0
    published = (tmp_path / "docs" / "generated" / "quick.md").read_text()
    assert "**Skipped in the run of" in published and "no Omniglot in /nowhere" in published
    assert "The numbers below are from an earlier run." in published and "| 0.9 |" in published
    assert published.count("**Skipped") == 1
    assert "omniglot       skipped     no Omniglot in /nowhere" in capsys.readouterr().out
    assert run_all.main(["--only", "omniglot", "--publish", "--no-progress"]) == 0  # skipped again
    assert (tmp_path / "docs" / "generated" / "quick.md").read_text().count("The numbers below are from an") == 1


def test_each_experiment_runs_in_a_fresh_process(tmp_path, monkeypatch):
    """run_experiment runs the experiment's run_profile in a spawned process (so what an earlier
    experiment did to this process, e.g. BLAS held to one thread, cannot change its numbers), and
    brings back its table and folders."""
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.chdir(tmp_path)  # the experiment's runs/ folder goes here
    import run_all

    spawned = []
    real = run_all.multiprocessing.get_context
    monkeypatch.setattr(run_all.multiprocessing, "get_context", lambda kind: spawned.append(kind) or real(kind))
    table, folders = run_all.run_experiment("sinusoid", "smoke", False, False, {})
    assert spawned == ["spawn"]
    assert "### Sinusoid regression (smoke profile: 1000 meta-iterations" in table
    assert folders == ["runs/smoke/sinusoid"] and (tmp_path / "runs/smoke/sinusoid/results.json").exists()


def test_the_followups_rows_run_only_when_named():
    spec = importlib.util.spec_from_file_location("run_all", os.path.join(ROOT, "run_all.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "followups" in module.EXPERIMENTS
    assert all("followups" not in names for names in module.DEFAULT.values())
    assert callable(module.EXPERIMENTS["followups"].run_profile)


def test_a_failed_experiment_is_one_line_and_the_others_still_run(run_all, tmp_path, capsys):
    """A folder in use, a run already there, a diverged run: one line, the next experiment runs, the
    report says why where the numbers would be, and the exit status is 1."""
    from minimaml.experiments.common import RunFolderError
    run_all.outcome["raise"] = RunFolderError("--out-dir runs/quick/sinusoid already holds a run")
    assert run_all.main(["--only", "sinusoid,omniglot", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "sinusoid: failed: --out-dir runs/quick/sinusoid already holds a run" in out
    assert "sinusoid       failed" in out and "omniglot       ran" in out and "Traceback" not in out
    report = (tmp_path / "runs" / "quick" / "report.md").read_text()
    assert "**Failed in the run of" in report and "already holds a run" in report


def test_ctrl_c_ends_with_a_summary_and_a_report_that_says_interrupted(run_all, tmp_path, capsys):
    run_all.outcome["raise"] = KeyboardInterrupt()
    assert run_all.main(["--only", "sinusoid,omniglot", "--no-progress"]) == 130
    out = capsys.readouterr().out
    assert "sinusoid       interrupted" in out and "not run        omniglot" in out and "total" in out
    assert "**Interrupted (Ctrl-C)" in (tmp_path / "runs" / "quick" / "report.md").read_text()


def test_sigterm_is_taken_as_ctrl_c(run_all):
    """A killed run_all must not leave its experiment's process running on its own: SIGTERM becomes the
    KeyboardInterrupt whose path terminates the pool (the test above)."""
    import signal
    previous = signal.getsignal(signal.SIGTERM)
    try:
        run_all.interrupt_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_resume_and_overwrite_together_are_refused(run_all, capsys):
    with pytest.raises(SystemExit) as exit:
        run_all.main(["--only", "sinusoid", "--resume", "--overwrite"])
    assert exit.value.code == 2 and "give one" in capsys.readouterr().err
