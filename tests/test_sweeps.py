"""Sweeps beyond the basic launcher: Optuna HPO and submitit launching, through run.py as a user runs them."""

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

from locallearn.config import PROJECT_ROOT
from tests.conftest import TINY, tiny_args


def run_py(*args, timeout=300):
    return subprocess.run([sys.executable, "run.py", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_optuna_search_of_two_trials_reports_its_best_value(tmp_path):
    tiny = [o for o in TINY if not o.startswith("schedule.warmup_steps")]
    proc = run_py("hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
                  "schedule.warmup_steps=choice(0,2)", *tiny, f"paths.log_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    (sweep,) = (tmp_path / "multiruns").iterdir()
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    finals = []
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()):
        summary = json.loads((job / "summary.json").read_text())
        finals.append(list(summary["val_loss"].values())[-1])
    assert len(finals) == 2
    assert results["best_value"] == min(finals)  # the last chunk's final val loss, minimized
    assert set(results["best_params"]) == {"optim.lr", "schedule.warmup_steps"}
    log = proc.stdout + proc.stderr
    assert "Best value" in log
    # quiet plugins: no alembic setup lines, no colour codes in a log file, no optuna INFO
    assert "alembic" not in log and "\x1b[" not in log and "A new study created" not in log


def test_a_refused_trial_does_not_abort_the_study(tmp_path):
    tiny = [o for o in TINY if not o.startswith("schedule.warmup_steps")]
    proc = run_py("hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=3",
                  "schedule.warmup_steps=choice(1,50)", *tiny, f"paths.log_dir={tmp_path}")  # 50 >= max_steps
    assert proc.returncode == 0, proc.stderr
    (sweep,) = (tmp_path / "multiruns").iterdir()
    statuses = [json.loads((p / "summary.json").read_text())["status"] for p in sweep.iterdir() if p.is_dir()
                and p.name[0].isdigit()]
    assert len(statuses) == 3 and "finished" in statuses
    assert any(s.startswith("failed: ConfigError: schedule.warmup_steps=50") for s in statuses), statuses
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] < float("inf")


def test_submitit_local_multirun_writes_every_summary(tmp_path):
    proc = run_py("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", *tiny_args("chunks=1,2"),
                  f"paths.log_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    summaries = sorted((tmp_path / "multiruns").glob("*/*/summary.json"))
    assert len(summaries) == 2
    assert [json.loads(p.read_text())["chunks"] for p in summaries] == [1, 2]
    assert all(json.loads(p.read_text())["status"] == "finished" for p in summaries)


def test_a_sweep_in_which_every_job_is_refused_exits_non_zero_with_the_count(tmp_path):
    proc = run_py("-m", *tiny_args("chunks=7,9"), f"paths.log_dir={tmp_path}")  # model=tiny has 4 blocks
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: all 2 jobs of the sweep failed or were refused"), last
    summaries = sorted((tmp_path / "multiruns").glob("*/*/summary.json"))
    assert len(summaries) == 2 and all(json.loads(p.read_text())["status"].startswith("failed: ConfigError")
                                       for p in summaries)
    proc = run_py("-m", *tiny_args("chunks=2,9"), f"paths.log_dir={tmp_path / 'mixed'}")  # one job trains
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
                    reason="the Ray launcher is an optional extra: pip install -e '.[ray]'")
def test_ray_launcher_runs_a_local_sweep(tmp_path):
    proc = run_py("-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2", *tiny_args("chunks=1,2"),
                  f"paths.log_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted((tmp_path / "multiruns").glob("*/*/summary.json"))
    assert [json.loads(p.read_text())["chunks"] for p in summaries] == [1, 2]
    assert all(json.loads(p.read_text())["status"] == "finished" for p in summaries)


@pytest.mark.slow
def test_sweep_timing_times_one_sweep_three_ways(tmp_path):
    out = tmp_path / "timing.json"
    proc = subprocess.run([sys.executable, "analysis/sweep_timing.py", "--jobs", "2", "--out", str(out), "--set",
                           "model=tiny", "trainer.max_steps=6", "trainer.val_check_interval=6",
                           "data.n_train_tokens=20000", "data.n_val_tokens=4000"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 and [(r["jobs"], r["finished"]) for r in rows[:2]] == [(6, 6), (6, 6)]
    assert "| one after another (basic launcher) | 6/6 |" in proc.stdout
