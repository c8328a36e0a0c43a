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

from locallearn.analysis import loss_plots
from locallearn.analysis.curve_fit import CurveTooShort, fit_curves, fit_power_law, gap_crossing, lr_note
from locallearn.config import PROJECT_ROOT

STEPS = np.arange(250, 5001, 250)
NOT_A_POWER_LAW = [3.12, 3.09, 3.15, 3.16, 2.97, 2.90, 2.83, 2.75]  # climbs at a too-high LR, falls as it decays
LR_STEPS = np.arange(0, 5000, 10)  # as TensorBoard holds train/lr/chunk{k} (every log_every_n_steps)


def power(a, b, c, t=STEPS):
    return a * np.asarray(t, dtype=float) ** (-b) + c


def constant_lr(peak=1e-3, steps=LR_STEPS, warmup=100):
    return list(steps), [peak * min(1.0, (s + 1) / warmup) for s in steps]


def cosine_lr(peak=1e-3, steps=LR_STEPS, warmup=100, ratio=0.1):
    total = steps[-1] + 1
    return list(steps), [peak * (s + 1) / warmup if s < warmup else
                         peak * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
                         for s in steps]


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
    assert not fit_power_law(t, NOT_A_POWER_LAW).identified
    rng = np.random.default_rng(1)  # a curve that has flattened: a is loose, but b and c are pinned down
    flattened = fit_power_law(t, power(2600, 1.7, 2.77, t) + rng.normal(0, 0.004, len(t)))
    assert flattened.a_std > 0.5 * flattened.a and flattened.identified


def test_the_lr_rule_passes_a_constant_lr_after_warmup_and_nothing_else():
    assert lr_note(constant_lr(), 250, 5000) == ""
    assert lr_note(constant_lr(warmup=400), 250, 5000) == ""  # the warmup before the LR peaks does not count
    assert lr_note(None, 250, 5000) == "" and lr_note(([], []), 250, 5000) == ""  # no LR logged: no evidence
    decays = lr_note(cosine_lr(), 250, 5000)
    assert decays.startswith("the learning rate decays to the end of the run (from 9.9")
    assert "to 1.00e-04 over the fitted steps), so the curve's end follows the schedule; fit a constant-LR run " \
           "(schedule=constant) to extrapolate" in decays
    steps = list(LR_STEPS)
    cyclic = [1e-3 * (0.55 + 0.45 * math.sin(s / 200)) for s in steps]
    assert lr_note((steps, cyclic), 250, 5000).startswith("the learning rate varies over the fitted steps")
    hover = [1e-3 * (1 + 0.02 * math.sin(s / 200)) for s in steps]  # within the 5% tolerance: constant
    assert lr_note((steps, hover), 250, 5000) == ""


def test_only_a_constant_lr_identified_fit_is_extrapolated():
    clean = {1: (list(STEPS), list(power(6.0, 0.45, 1.6)))}
    (fit,) = fit_curves(clean, {1: constant_lr()}).values()
    assert fit.not_extrapolated == "" and fit.to_dict(50_000)["predicted"]["loss"] == pytest.approx(
        power(6.0, 0.45, 1.6, 50_000), abs=1e-3)
    assert "not extrapolated" not in fit.markdown_cells(50_000)

    (fit,) = fit_curves(clean, {1: cosine_lr()}).values()  # the same points, under a cosine schedule
    d = fit.to_dict(50_000)
    assert "predicted" not in d and d["not_extrapolated"].startswith("the learning rate decays to the end of the run")
    assert "| not extrapolated: the learning rate decays" in fit.markdown_cells(50_000)

    t = np.arange(250, 2001, 250)
    (fit,) = fit_curves({1: (list(t), NOT_A_POWER_LAW)}, {1: constant_lr()}).values()
    d = fit.to_dict(20_000)
    assert "predicted" not in d and not d["identified"]
    assert d["not_extrapolated"].startswith("not identified: the data do not pin the exponent and the asymptote down")


def test_the_figure_draws_a_fit_past_the_data_only_if_it_is_extrapolated(tmp_path):
    clean = {1: (list(STEPS), list(power(6.0, 0.45, 1.6)))}
    good = fit_curves(clean, {1: constant_lr()})
    decayed = fit_curves(clean, {1: cosine_lr()})
    assert loss_plots.fit_steps(good[1], 50_000)[-1] == pytest.approx(50_000)
    assert loss_plots.fit_steps(decayed[1], 50_000)[-1] == pytest.approx(STEPS[-1])
    for fits, reaches in ((good, True), (decayed, False)):
        fig = loss_plots.curve_fit_figure(clean, fits, 50_000)
        (ax,) = fig.axes
        drawn = max(max(line.get_xdata()) for line in ax.get_lines())  # points, fit, and any prediction line
        assert (drawn == pytest.approx(50_000)) if reaches else (drawn == pytest.approx(STEPS[-1]))
        assert all(max(c.get_paths()[0].vertices[:, 0]) <= drawn * (1 + 1e-9) for c in ax.collections)  # bands
        loss_plots.plt.close(fig)
    assert loss_plots.curve_fits(clean, decayed, tmp_path / "fit.png", 50_000).stat().st_size > 0


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


def fake_run(root, job, overrides, curves, steps=STEPS, lr=None):
    """A finished job directory: overrides, summary.json, per-chunk val curves and the LR each chunk logged
    (``lr``: (steps, values); a constant LR after warmup by default) in TensorBoard."""
    lr = lr or constant_lr()
    d = root / f"{job}_{','.join(overrides)}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    finals = {f"chunk{k + 1}": float(c[-1]) for k, c in enumerate(curves)}
    seed = next((int(o.split("=")[1]) for o in overrides if o.startswith("seed=")), 0)
    (d / "summary.json").write_text(json.dumps({"status": "finished", "chunks": len(curves), "val_loss": finals,
                                                "config": {"seed": seed}}))
    with SummaryWriter(str(d / "tb")) as w:
        for k, curve in enumerate(curves):
            for s, v in zip(steps, curve):
                w.add_scalar(f"val/loss/chunk{k + 1}", float(v), int(s))
            for s, v in zip(*lr):
                w.add_scalar(f"train/lr/chunk{k + 1}", float(v), int(s))
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


def test_fit_curves_does_not_extrapolate_a_cosine_run_or_an_unidentified_fit(tmp_path):
    root = tmp_path / "sweep"
    t = np.arange(50, 401, 50)  # a 400-step run
    fake_run(root, 0, ["chunks=1", "seed=0"], [power(6.0, 0.5, 1.50, t)], t, constant_lr(steps=np.arange(400)))
    fake_run(root, 1, ["chunks=2", "seed=0"], [power(4.5, 0.5, 1.60, t), power(4.0, 0.5, 1.55, t)], t,
             cosine_lr(steps=np.arange(400), warmup=20))
    fake_run(root, 2, ["chunks=2", "seed=1"], [power(4.5, 0.5, 1.60, t), NOT_A_POWER_LAW], t,
             constant_lr(steps=np.arange(400)))
    fake_run(root, 3, ["chunks=1", "seed=1"], [power(6.0, 0.5, 1.50, t)], t, constant_lr(steps=np.arange(400)))
    proc = subprocess.run([sys.executable, "analysis/fit_curves.py", str(root), "--target-step", "20000"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = root / "fits"
    rows = {(r["run"].split("/")[-1][0], r["chunk"]): r for r in csv.DictReader((out / "fits.csv").open())}
    assert float(rows["0", "1"]["predicted"]) == pytest.approx(power(6.0, 0.5, 1.50, 20_000), abs=1e-3)
    for key in (("1", "1"), ("1", "2")):
        assert rows[key]["predicted"] == "" and rows[key]["not_extrapolated"].startswith("the learning rate decays")
    assert rows["2", "2"]["predicted"] == "" and rows["2", "2"]["not_extrapolated"].startswith("not identified")
    switch = {r["run"].split("/")[-1][0]: r for r in csv.DictReader((out / "switch.csv").open())}
    assert set(switch) == {"1", "2"} and switch["1"]["step"] == switch["2"]["step"] == ""
    assert switch["2"]["reference"].endswith("3_chunks=1,seed=1")  # the end-to-end run of the same seed
    assert switch["1"]["not_extrapolated"].startswith("the last chunk's fit is not extrapolated: the learning rate")
    assert switch["2"]["not_extrapolated"].startswith("the last chunk's fit is not extrapolated: not identified")
    md = (out / "fits.md").read_text()
    assert "no need" not in md and md.count("not extrapolated: the learning rate decays") >= 2


def test_fit_curves_refuses_a_local_reference(tmp_path):
    local = fake_run(tmp_path, 0, ["chunks=2"], [power(4.5, 0.5, 1.6), power(4.0, 0.5, 1.55)])
    proc = subprocess.run([sys.executable, "analysis/fit_curves.py", str(local), "--reference", str(local)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has 2 chunks; pass an end-to-end (chunks=1) run" in proc.stderr
