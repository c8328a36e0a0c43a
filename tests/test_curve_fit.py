"""Power-law fits of loss curves, the switch-step estimate, and analysis/fit_curves.py on finished runs."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from locallearn.config import PROJECT_ROOT
from locallearn.curve_fit import CurveTooShort, fit_power_law, gap_crossing

STEPS = np.arange(250, 5001, 250)


def power(a, b, c, t=STEPS):
    return a * np.asarray(t, dtype=float) ** (-b) + c


def test_the_fit_recovers_a_b_c_within_5_percent():
    rng = np.random.default_rng(0)
    a, b, c = 6.0, 0.45, 1.6
    fit = fit_power_law(STEPS, power(a, b, c) + rng.normal(0, 0.002, len(STEPS)))
    assert fit.a == pytest.approx(a, rel=0.05) and fit.b == pytest.approx(b, rel=0.05)
    assert fit.c == pytest.approx(c, rel=0.05)
    assert 0 < fit.c_std < 0.05 and fit.n == len(STEPS) and fit.identified
    mean, std, lo, hi = fit.predict(50_000)
    assert mean == pytest.approx(power(a, b, c, 50_000), abs=3 * std + 1e-3) and lo <= mean <= hi


def test_one_bad_evaluation_does_not_drag_the_fit():
    y = power(6.0, 0.45, 1.6)
    y[7] += 0.5  # an evaluation gone wrong
    fit = fit_power_law(STEPS, y)
    assert fit.c == pytest.approx(1.6, rel=0.05) and fit.b == pytest.approx(0.45, rel=0.1)


def test_a_curve_that_is_not_a_power_law_is_flagged():
    t = np.arange(250, 2001, 250)
    y = [3.12, 3.09, 3.15, 3.16, 2.97, 2.90, 2.83, 2.75]  # climbs at a too-high LR, falls as it decays
    assert not fit_power_law(t, y).identified
    rng = np.random.default_rng(1)  # a curve that has flattened: a is loose, but b and c are pinned down
    flattened = fit_power_law(t, power(2600, 1.7, 2.77, t) + rng.normal(0, 0.004, len(t)))
    assert flattened.a_std > 0.5 * flattened.a and flattened.identified


def test_a_curve_too_short_to_fit_gets_a_message():
    with pytest.raises(CurveTooShort, match=r"3 usable points .* needs at least 5: evaluate more often"):
        fit_power_law([100, 200, 300, 400], [3.0, 2.5, math.nan, 2.2])


def test_the_switch_step_is_where_the_gap_stays_above_the_tolerance():
    local = fit_power_law(STEPS, power(4.0, 0.5, 1.55))  # better early (smaller a), worse late (higher c)
    e2e = fit_power_law(STEPS, power(6.0, 0.5, 1.50))
    cross = gap_crossing(local, e2e, tol=0.02, t_from=250, t_to=100_000)
    # the gap is 0.05 - 2 t^-0.5, which exceeds 0.02 from t = (2 / 0.03)^2 = 4444 on
    assert cross["step"] == pytest.approx(4444, rel=0.02)
    assert cross["gap_at_start"] < 0 < cross["gap_at_end"] and cross["fraction_crossing"] == 1.0
    assert math.isnan(gap_crossing(local, e2e, tol=0.2, t_from=250, t_to=100_000)["step"])  # never that far behind


def fake_run(root, job, overrides, curves, steps=STEPS):
    """A finished job directory: overrides, summary.json and per-chunk val curves in TensorBoard."""
    d = root / f"{job}_{','.join(overrides)}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    finals = {f"chunk{k + 1}": float(c[-1]) for k, c in enumerate(curves)}
    (d / "summary.json").write_text(json.dumps({"status": "finished", "chunks": len(curves), "val_loss": finals}))
    with SummaryWriter(str(d / "tb")) as w:
        for k, curve in enumerate(curves):
            for s, v in zip(steps, curve):
                w.add_scalar(f"val/loss/chunk{k + 1}", float(v), int(s))
    return d


def test_fit_curves_reports_fits_and_the_switch_step_of_a_sweep(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root, 0, ["chunks=1", "seed=0"], [power(6.0, 0.5, 1.50)])
    fake_run(root, 1, ["chunks=2", "seed=0"], [power(4.5, 0.5, 1.60), power(4.0, 0.5, 1.55)])
    fake_run(root, 2, ["chunks=2", "seed=1"], [power(4.5, 0.5, 1.60)[:3], power(4.0, 0.5, 1.55)[:3]], STEPS[:3])
    proc = subprocess.run([sys.executable, "analysis/fit_curves.py", str(root), "--tolerance", "0.02",
                           "--target-step", "100000"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = root / "fits"
    rows = list(csv.DictReader((out / "fits.csv").open()))
    assert [(r["run"].split("/")[-1][0], r["chunk"]) for r in rows] == [("0", "1"), ("1", "1"), ("1", "2"),
                                                                       ("2", "1"), ("2", "2")]
    assert float(rows[0]["c"]) == pytest.approx(1.50, rel=0.01)
    assert "3 usable points" in rows[3]["error"]  # too short: a message in the table, not a crash
    (switch,) = list(csv.DictReader((out / "switch.csv").open()))
    assert switch["reference"].endswith("0_chunks=1,seed=0") and float(switch["step"]) == pytest.approx(4444, rel=0.02)
    assert "When to switch to global training" in proc.stdout and "4,4" in proc.stdout
    assert {p.name for p in out.glob("fit_*.png")} == {f"fit_{d.name}.png" for d in root.iterdir() if d.name != "fits"}


def test_fit_curves_refuses_a_local_reference(tmp_path):
    local = fake_run(tmp_path, 0, ["chunks=2"], [power(4.5, 0.5, 1.6), power(4.0, 0.5, 1.55)])
    proc = subprocess.run([sys.executable, "analysis/fit_curves.py", str(local), "--reference", str(local)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has 2 chunks; pass an end-to-end (chunks=1) run" in proc.stderr
