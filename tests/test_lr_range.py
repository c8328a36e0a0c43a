"""The per-chunk LR range test: suggestions inside the swept range, its outputs, and its bad input."""

import csv
import json
import math
import re
import subprocess
import sys

import pytest

from locallearn.config import PROJECT_ROOT
from locallearn.errors import ConfigError
from locallearn.runner import build
from locallearn.training.lr_range_test import SMOOTH_FRACTION, RangeSettings, run
from tests.conftest import TINY, tiny_overrides

RANGE = RangeSettings(lr_min=1e-5, lr_max=10.0, steps=60)


def test_one_suggestion_per_chunk_inside_the_swept_range(make_cfg):
    r = build(make_cfg("chunks=2"))
    r.datamodule.setup("fit")
    results = run(r.module, r.datamodule.train_dataloader(), RANGE)
    assert [c.chunk for c in results] == [1, 2]
    for c in results:
        assert RANGE.lr_min <= c.steepest <= RANGE.lr_max
        assert RANGE.lr_min <= c.min_loss_lr / 10 <= RANGE.lr_max
        assert c.lrs == sorted(c.lrs) and len(c.lrs) == len(c.losses) == len(c.smoothed)
        assert c.min_loss < c.smoothed[0]  # the loss fell somewhere in the sweep
        assert c.diverged_at is not None  # lr 10 is far too high for anything
        ema, beta = 0.0, RANGE.ema_factor  # the smoothed loss is the bias-corrected EMA of the default window
        for i, (loss, s) in enumerate(zip(c.losses, c.smoothed)):
            ema = beta * ema + (1 - beta) * loss
            assert s == pytest.approx(ema / (1 - beta ** (i + 1)))


@pytest.mark.parametrize("steps", [100, 300, 1000])
def test_the_default_smoothing_window_is_a_fixed_fraction_of_the_sweep(steps):
    """So the smoothed curve lags the LR by the same share of the swept range, however long the sweep."""
    beta = RangeSettings(steps=steps).ema_factor
    assert 1 / (1 - beta) == pytest.approx(SMOOTH_FRACTION * steps)  # the EMA's time constant, in steps
    assert RangeSettings(steps=300).ema_factor == pytest.approx(1 - 1 / 15)
    assert RangeSettings(steps=12).ema_factor == 0.0  # a window under one step: no smoothing
    assert RangeSettings(steps=steps, smooth=0.98).ema_factor == 0.98  # an explicit factor is kept


def test_the_config_leaves_the_smoothing_to_the_sweep_length():
    from omegaconf import OmegaConf

    assert OmegaConf.load(PROJECT_ROOT / "conf" / "lr_range_test.yaml").lr_range.smooth is None
    assert math.isclose(RangeSettings().ema_factor, 1 - 1 / (SMOOTH_FRACTION * RangeSettings().steps))


def test_the_script_writes_csv_rows_per_chunk_suggestions_and_figure(tmp_path):
    cmd = [sys.executable, "analysis/lr_range_test.py", "chunks=2", *TINY, "lr_range.steps=40",
           "lr_range.lr_min=1e-5", "lr_range.lr_max=10", f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (out,) = (tmp_path / "lr_range").iterdir()
    rows = list(csv.DictReader((out / "lr_range.csv").open()))
    assert {r["chunk"] for r in rows} == {"1", "2"}
    suggestions = json.loads((out / "suggestions.json").read_text())
    assert [c["chunk"] for c in suggestions["chunks"]] == [1, 2]
    assert suggestions["override"].startswith("optim.chunk_lr=[") and suggestions["override"] in proc.stdout
    assert (out / "lr_range.png").stat().st_size > 0 and any((out / "tb").iterdir())
    assert (out / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize("settings, message", [
    ({"lr_min": 1e-2, "lr_max": 1e-3}, "lr_range.lr_min=0.01 must be below lr_range.lr_max=0.001"),
    ({"lr_min": 1e-2, "lr_max": 1e-2}, "lr_range.lr_min=0.01 must be below lr_range.lr_max=0.01"),
    ({"lr_min": 0.0}, "lr_range.lr_min=0.0 and lr_range.lr_max=1.0 must both be positive"),
    ({"lr_min": -1e-3}, "lr_range.lr_min=-0.001 and lr_range.lr_max=1.0 must both be positive"),
    ({"steps": 5}, "lr_range.steps=5 is too short"),
    ({"smooth": 1.0}, "lr_range.smooth=1.0 must lie in [0, 1) (the EMA factor), or be null"),
])
def test_bad_sweep_ranges_are_refused(settings, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        RangeSettings(**settings).check()


def test_the_script_refuses_a_bad_range_before_loading_data(tmp_path):
    data = ["data=text", "data.path=/nonexistent.txt"]  # would fail too, but only once data loads
    cmd = [sys.executable, "analysis/lr_range_test.py", *tiny_overrides(data), *data, "lr_range.lr_min=1",
           "lr_range.lr_max=0.1", f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: lr_range.lr_min=1 must be below lr_range.lr_max=0.1")
