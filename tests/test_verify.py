"""The verification report's meta-gradient rows: every (setting, mode) and the Fisher product pass, and
a planted error in one mode makes exactly its rows fail."""

import io

from minimaml import maml, verify


def test_meta_gradient_report_passes_with_a_row_per_setting_and_mode():
    out = io.StringIO()
    assert verify.meta_gradient_report(file=out)
    rows = [line for line in out.getvalue().splitlines() if line.endswith("  ok")]
    assert len(rows) == 3 * 3 + 1
    for setting in ("MLP regression", "conv + BN + max-pool classifier", "RL REINFORCE, Gaussian policy"):
        assert sum(row.startswith(setting) for row in rows) == 3
    assert any(row.startswith("MAML-TRPO Fisher-vector product") for row in rows)


def test_a_wrong_meta_gradient_fails_its_rows(monkeypatch):
    real = maml._meta_gradient_hvp

    def off_by_a_bit(*args):
        loss, grads, metrics = real(*args)
        return loss, {n: g * 1.001 for n, g in grads.items()}, metrics

    monkeypatch.setattr(maml, "_meta_gradient_hvp", off_by_a_bit)
    out = io.StringIO()
    assert not verify.meta_gradient_report(file=out)
    failed = [line for line in out.getvalue().splitlines() if line.endswith("FAIL")]
    assert len(failed) == 3 and all(" hvp " in line for line in failed)


def test_followups_report_passes_with_a_row_per_check():
    out = io.StringIO()
    assert verify.followups_report(file=out)
    text = out.getvalue()
    for row in ("Meta-SGD w.r.t. alpha", "MAML++ MSL w.r.t. rates", "Reptile (adam) vs per-task loop",
                "iMAML least squares, gradient"):
        assert row in text
    curve = [line for line in text.splitlines() if line.startswith("iMAML MLP")]
    assert len(curve) >= 3 and all(" curve " in line for line in curve[:-1]) and "  ok (CG" in curve[-1]
    assert "all passed" in text and "FAIL" not in text
