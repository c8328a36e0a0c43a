"""Per-chunk diagnostics: detectors on synthetic loss streams, and divergence stopping a real run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from locallearn.analysis.detectors import (
    DivergenceWatch,
    Thresholds,
    find_overfitting,
    find_plateaus,
    find_rising,
    find_spikes,
)
from locallearn.analysis.diagnose import Context, diagnose
from locallearn.config import PROJECT_ROOT
from locallearn.errors import ConfigError
from locallearn.runner import build, train
from tests.conftest import TINY

STEPS = np.arange(2000)
EVAL_STEPS = list(range(100, 2001, 100))


def clean_train(seed=0):
    """A decreasing loss with step-to-step noise, as a healthy chunk's training loss."""
    rng = np.random.default_rng(seed)
    return list(STEPS), list(2.0 + 2.5 * (1 + STEPS / 50) ** -0.6 + rng.normal(0, 0.03, len(STEPS)))


def clean_val():
    t = np.asarray(EVAL_STEPS, dtype=float)
    return EVAL_STEPS, list(1.0 + 3.0 * (t / 100) ** -0.8)


def test_a_planted_spike_is_found_at_its_step():
    steps, values = clean_train()
    values[1234] += 1.0
    assert [s for s, _, _ in find_spikes(steps, values)] == [1234]
    findings = diagnose({1: (steps, values)}, {1: clean_val()})
    assert [(f.kind, f.chunk, f.first_step) for f in findings] == [("spike", 1, 1234)]
    assert "1 spike at step 1234" in findings[0].evidence


def spiked(seed, *steps):
    """A clean train curve with a spike planted at each of ``steps``."""
    s, values = clean_train(seed)
    for step in steps:
        values[step] += 1.0
    return s, values


def test_a_spike_every_chunk_shows_at_one_step_is_the_batchs_reported_once():
    """As at step 538 of the issue: chunk 1, whose input is the batch itself, spikes with the chunks after it
    (chunk 3 a step late), so no chunk is blamed on the one before it."""
    train = {1: spiked(0, 538), 2: spiked(1, 538), 3: spiked(2, 539)}
    (finding,) = diagnose(train, {})
    assert (finding.kind, finding.chunks, finding.first_step) == ("batch spike", [1, 2, 3], 538)
    assert "an unusual batch" in finding.cause and "chunk 1, whose input is the data itself" in finding.cause
    assert "nothing if they stay rare" in finding.remedy
    assert finding.line().startswith("chunks 1, 2, 3, step 538: batch spike (train): 1 spike of chunk 1 and later")
    # chunk 1 with only some of the later chunks is the batch's too, and the others' own spikes stay theirs
    findings = diagnose({1: spiked(0, 538), 2: spiked(1), 3: spiked(2, 539, 1500)}, {})
    assert [(f.kind, f.chunks or [f.chunk], f.first_step) for f in findings] == [
        ("batch spike", [1, 3], 538), ("spike", [3], 1500)]
    assert "follow spikes" not in findings[1].cause


def test_a_spike_the_previous_chunk_shows_without_chunk_1_is_blamed_on_the_previous_chunk():
    train = {1: spiked(0), 2: spiked(1, 538, 1500), 3: spiked(2, 538, 1501)}
    findings = diagnose(train, {})
    assert [(f.kind, f.chunk) for f in findings] == [("spike", 2), ("spike", 3)]
    assert "follow spikes of chunk 2" in findings[1].cause
    assert "follow spikes" not in findings[0].cause  # chunk 2's own: chunk 1 did not spike
    # chunk 1 spiking alone is its own spike, not the batch's
    (alone,) = diagnose({1: spiked(0, 538), 2: spiked(1)}, {})
    assert (alone.kind, alone.chunk, alone.chunks) == ("spike", 1, None)


def test_a_clean_decreasing_curve_yields_no_finding():
    ctx = Context(unigram_entropy=4.0)
    findings = diagnose({1: clean_train(0), 2: clean_train(1)}, {1: clean_val(), 2: clean_val()}, ctx)
    assert findings == []


def test_a_loss_that_climbs_at_the_peak_lr_is_a_learning_rate_too_high():
    """As with a 10x learning rate: the loss falls during warmup, climbs back at the peak, and falls again only
    as the schedule decays the LR."""
    rng = np.random.default_rng(0)
    shape = np.interp(STEPS, [0, 100, 1000, 2000], [4.2, 2.8, 3.1, 2.7])
    values = list(shape + rng.normal(0, 0.05, len(STEPS)))
    lr = (list(STEPS), list(np.interp(STEPS, [0, 100, 2000], [0.0, 0.07, 0.007])))
    ((first, last, best, high),) = find_rising(STEPS, values, window=100, rel=0.02)
    assert 100 <= first <= 400 and 1500 <= last <= 1700 and high / best > 1.05  # until back within 2% of the best
    (finding,) = diagnose({1: (list(STEPS), values)}, {}, Context(lr={1: lr}))
    assert finding.kind == "rising loss" and "learning rate likely too high for chunk 1" in finding.cause
    assert "only once the schedule lowered the LR" in finding.cause
    assert find_rising(*clean_train(), window=100, rel=0.02) == []


def test_a_plateau_is_found_and_blamed_on_the_previous_chunk_when_both_stall():
    flat = [3.0 - 0.2 * i for i in range(6)] + [1.8 + 0.0005 * (i % 2) for i in range(8)]  # stalls at eval 6
    steps = EVAL_STEPS[:len(flat)]
    assert find_plateaus(steps, flat, evals=3, rel=0.002) == [(700, 1400, pytest.approx(0.0))]
    findings = diagnose({}, {1: (steps, flat), 2: (steps, [v + 0.1 for v in flat])})
    plateaus = [f for f in findings if f.kind == "plateau"]
    assert [(f.chunk, f.first_step, f.last_step) for f in plateaus] == [(1, 700, 1400), (2, 700, 1400)]
    assert "chunk 1 plateaued over the same steps" in plateaus[1].cause


def test_a_plateau_at_a_decayed_learning_rate_is_blamed_on_the_schedule():
    flat = [3.0 - 0.2 * i for i in range(6)] + [1.8] * 6
    steps = EVAL_STEPS[:len(flat)]
    lr = (list(range(1200)), [1e-3 * (1 - s / 1200) + 1e-5 for s in range(1200)])
    (finding,) = diagnose({}, {1: (steps, flat)}, Context(lr={1: lr}))
    assert finding.kind == "plateau" and "schedule has decayed" in finding.cause


def test_a_plateau_at_a_high_lr_that_breaks_when_the_lr_decays_is_blamed_on_the_lr():
    values = [3.0, 2.9, 2.9, 2.9, 2.9, 2.9, 2.5, 2.2]  # stuck while the LR is high, then falls as it decays
    steps = EVAL_STEPS[:len(values)]
    lr = (list(range(800)), [0.07 if s < 500 else 0.07 * (800 - s) / 300 for s in range(800)])
    (finding,) = diagnose({}, {1: (steps, values)}, Context(lr={1: lr}))
    assert finding.kind == "plateau" and "learning rate likely too high for chunk 1" in finding.cause


def test_overfitting_is_found_with_the_gap_trend():
    train_steps = list(range(1, 1001))
    train_values = [3.0 - 0.0015 * s for s in train_steps]  # falls throughout
    val_steps = list(range(100, 1001, 100))
    val_values = [2.9, 2.7, 2.5, 2.4, 2.35, 2.4, 2.5, 2.62, 2.75, 2.9]  # turns up after step 500
    (first, last, rise, slope), = find_overfitting((train_steps, train_values), (val_steps, val_values), evals=3)
    assert (first, last) == (500, 1000) and rise == pytest.approx(0.55)
    assert slope > 0  # the val - train gap grows
    findings = diagnose({1: (train_steps, train_values)}, {1: (val_steps, val_values)})
    assert [(f.kind, f.first_step, f.last_step) for f in findings] == [("overfitting", 500, 1000)]
    assert "dropout" in findings[0].remedy


def test_a_val_loss_that_rises_while_train_also_rises_is_not_overfitting():
    steps = list(range(1, 1001))
    val_steps = list(range(100, 1001, 100))
    rising = [2.0 + 0.001 * s for s in steps]
    assert find_overfitting((steps, rising), (val_steps, [2.0 + 0.001 * s for s in val_steps]), evals=3) == []


def test_underfitting_against_the_unigram_entropy():
    steps = list(range(1000))
    stuck = [3.3 + 0.01 * math.sin(s) for s in steps]
    ctx = Context(unigram_entropy=3.3, warmup_steps=100)
    (finding,) = diagnose({1: (steps, stuck)}, {}, ctx)
    assert finding.kind == "underfitting" and "unigram entropy 3.300" in finding.evidence
    learned = [2.5 + 0.01 * math.sin(s) for s in steps]
    assert diagnose({1: (steps, learned)}, {}, ctx) == []
    # span masking sums two cross-entropies: its baseline is twice the unigram entropy
    assert diagnose({1: (steps, [5.0] * 1000)}, {}, Context(unigram_entropy=3.3, loss_terms=2)) == []


def test_divergence_watch():
    watch = DivergenceWatch(ratio=1.5, window=5, start_steps=5)
    assert all(watch.check(1, 4.0) is None for _ in range(5))
    assert watch.check(1, float("nan")) == "train loss is nan"
    for _ in range(2):
        assert watch.check(2, 4.0) is None
    for v in [4.0, 4.0, 4.0, 7.0, 7.0]:
        assert watch.check(2, v) is None  # the median of the last 5 is still 4
    assert "above 1.5 x its starting value 4.000" in watch.check(2, 7.0)


def test_bad_thresholds_are_refused(make_cfg):
    with pytest.raises(ConfigError, match=r"callbacks.diagnostics.spike_window=3 must be .*at least 10"):
        build(make_cfg("callbacks.diagnostics.spike_window=3"))
    with pytest.raises(ConfigError, match=r"callbacks.diagnostics.spike_zz is not a diagnostics setting"):
        build(make_cfg("+callbacks.diagnostics.spike_zz=3"))


def test_a_run_writes_diagnostics_and_says_why_its_curves_are_too_short_to_fit(make_cfg):
    cfg = make_cfg("chunks=2")
    summary = train(cfg)
    out = Path(cfg.paths.output_dir)
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert diagnostics["status"] == "finished" and isinstance(diagnostics["findings"], list)
    assert summary["diagnostics"]["findings"] == len(diagnostics["findings"])
    assert set(summary["curve_fit"]) == {"chunk1", "chunk2"}
    assert "2 usable points" in summary["curve_fit"]["chunk1"]["error"]  # 6 steps, validated at 3 and 6
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert "diagnostics/text_summary" in acc.Tags()["tensors"]


def test_a_cosine_run_fits_its_val_curves_but_does_not_extrapolate_them(make_cfg):
    """The default schedule decays the LR to the end of the run, so the fits' ends follow the schedule."""
    cfg = make_cfg("chunks=2", "trainer.max_steps=30", "trainer.val_check_interval=5")
    summary = train(cfg)
    for k in (1, 2):
        fit = summary["curve_fit"][f"chunk{k}"]
        assert fit["points"] == 6 and "predicted" not in fit
        # peak 1e-3 at step 1, 9.75e-4 at the first evaluation (step 5), 1.03e-4 at the last step (29)
        assert fit["not_extrapolated"].startswith("the learning rate decays to the end of the run (from 9.75e-04 "
                                                  "to 1.03e-04 over the fitted steps)")
        assert "fit a constant-LR run (schedule=constant) to extrapolate" in fit["not_extrapolated"]
    out = Path(cfg.paths.output_dir)
    assert json.loads((out / "diagnostics.json").read_text())["curve_fit"] == summary["curve_fit"]
    assert (out / "curve_fit.png").is_file()


def test_a_planted_nan_stops_the_run_keeping_the_last_good_checkpoint_and_the_summary(tmp_path):
    cmd = [sys.executable, "run.py", "chunks=2", *TINY, "+callbacks.nan._target_=tests.conftest.NanAt",
           "+callbacks.nan.step=4", "+callbacks.nan.chunk=2", f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: chunk 2 diverged at step 4: train loss is nan; learning rate likely too high "
                           "for chunk 2")
    assert "last.ckpt (step 3)" in line
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"].startswith("diverged: chunk 2 diverged at step 4")
    assert summary["val_loss"] is not None and summary["steps"] == 5
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())
    diagnostics = json.loads((run_dir / "diagnostics.json").read_text())
    assert diagnostics["status"] == "diverged"
    first = diagnostics["findings"][0]
    assert (first["kind"], first["chunk"], first["first_step"]) == ("divergence", 2, 4)


def test_thresholds_are_the_config_defaults():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(PROJECT_ROOT / "conf" / "callbacks" / "default.yaml").diagnostics
    assert {k: cfg[k] for k in Thresholds.__dataclass_fields__} == vars(Thresholds())
