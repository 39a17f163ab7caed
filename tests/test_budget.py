"""The reward-model budget study (tools/budget.py): Gao et al.'s fit, and one study at the smoke size."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import budget

ROOT = Path(__file__).resolve().parents[1]


def test_fit_recovers_gaos_form_and_its_peak():
    kl = [0.0, 0.19, 0.64, 1.2, 1.84, 2.5]
    gains = [math.sqrt(k) * (0.6 - 0.3 * math.sqrt(k)) for k in kl]   # alpha 0.6, beta 0.3
    alpha, beta, peak_kl = budget.fit_gao(kl, gains)
    assert (alpha, beta) == pytest.approx((0.6, 0.3)) and peak_kl == pytest.approx(1.0)  # d* = 0.6 / 0.6
    assert budget.fit_gao(kl, [math.sqrt(k) for k in kl])[2] is None   # still rising: no peak
    # a straight line whose fitted beta is a rounding error of either sign: never a peak
    for eps in (1e-15, -1e-15, 3e-16):
        assert budget.fit_gao(kl, [math.sqrt(k) * (1 + eps * i) for i, k in enumerate(kl)])[2] is None
    # a clear but gentle bend still gives its peak, far out: d* = 1 / (2 * 0.01) = 50
    assert budget.fit_gao(kl, [math.sqrt(k) * (1 - 0.01 * math.sqrt(k)) for k in kl])[2] == pytest.approx(2500)
    assert budget.peak_n(1.0) == 8   # bounds: n=4 0.64, n=8 1.20, the nearer to 1.0


@pytest.mark.slow
def test_budget_study_runs_each_budget_on_the_same_policies(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, "tools/budget.py", "--preset=smoke", "--factors=1,2", f"--out_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"[pi_sft] loaded {out / 'x2' / 'pi_sft.pt'} (up to date)" in proc.stdout  # trained once, in x1
    study = json.loads((out / "budget_study.json").read_text())
    assert study["factors"] == [1, 2]
    rows = {(r["rm"], r["factor"]) for r in study["rows"]}
    assert {("init_sft", 1), ("init_sft", 2), ("pref", 2), ("oracle", 1), ("majority", 1)} <= rows
    assert ("oracle", 2) not in rows
    x2 = json.loads((out / "x2" / "results.json").read_text())["config"]
    assert (x2["rm_steps"], x2["n_rm_samples"], x2["methods"]) == (20, 4, "bon")
    assert "| init_sft | x2 |" in (out / "budget_study.md").read_text()


def test_a_budget_too_large_for_memory_is_refused_naming_factors(tmp_path, capsys):
    """x1000000 makes --n_rm_samples two million: refused before any training, with --factors as the fix."""
    with pytest.raises(SystemExit) as stop:
        budget.main(["--preset=smoke", "--factors=1000000", f"--out_dir={tmp_path}", "--device=cpu"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "lower --factors (x1000000 makes --n_rm_samples 2000000)" in err, err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.rglob("*.pt"))
