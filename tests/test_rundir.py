"""Run directories: every run its own, nothing in an existing run changed unless it is continued, checkpoints that
fit, last.ckpt at every validation, one line for a full disk or an unwritable log dir."""

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_args
from omegaconf import OmegaConf

from locallearn.config import PROJECT_ROOT
from locallearn.errors import ConfigError, TrainingDiverged
from locallearn.rundir import RunDirectory, claim_fresh, lock
from locallearn.runner import build, train


def snapshot(directory: Path) -> dict:
    """Every file under ``directory`` with its bytes and modification time."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def run_py(*args, log_dir: Path, env=None, timeout=300):
    cmd = [sys.executable, "run.py", *tiny_args(*args), f"paths.log_dir={log_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def one_error_line(proc) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def _claim(path, queue):
    queue.put(str(claim_fresh(Path(path))))


def test_runs_started_together_with_the_same_name_get_their_own_directories(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(tmp_path / "runs" / "2026-01-01_00-00-00_chunks=2", queue))
             for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    got = sorted(queue.get() for _ in procs)
    assert len(set(got)) == 6
    assert [Path(g).name for g in got] == ["2026-01-01_00-00-00_chunks=2"] + \
        [f"2026-01-01_00-00-00_chunks=2_{i}" for i in range(2, 7)]


def test_a_sweep_started_in_the_same_second_gets_a_directory_of_its_own(tmp_path):
    from hydra import compose, initialize_config_dir

    from locallearn.config import CONF_DIR

    taken = tmp_path / "multiruns" / "same"
    taken.mkdir(parents=True)
    (taken / "multirun.yaml").write_text("another sweep\n")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [f"paths.log_dir={tmp_path}"], return_hydra_config=True)
    cfg.hydra.sweep.dir = str(taken)
    RunDirectory().on_multirun_start(cfg)
    assert cfg.hydra.sweep.dir == f"{taken}_2" and Path(f"{taken}_2").is_dir()
    # every job's config is composed again from these overrides: they carry the new directory
    assert cfg.hydra.overrides.hydra[-1] == f"hydra.sweep.dir='{taken}_2'"
    assert (taken / "multirun.yaml").read_text() == "another sweep\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run through run.py (6 steps, validated at 3 and 6)."""
    log_dir = tmp_path_factory.mktemp("logs")
    proc = run_py("chunks=2", log_dir=log_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (log_dir / "runs").iterdir()
    return run_dir


@pytest.mark.parametrize("args, expected", [
    (["hydra.run.dir={run}"], ["hydra.run.dir=", "already holds files", "resume="]),
    (["resume={run}", "chunks=4"], ["resume=", "chunks=4 (the run has 2)", "start a new run"]),
    (["resume={run}", "model.n_embd=32"], ["model.n_embd=32 (the run has 16)"]),
    (["resume={run}", "objective=mlm"], ["objective._target_=locallearn.model.objectives.MaskedLM"]),
    (["resume={run}", "optim.lr=nan"], ["optim.lr=nan must be a finite number above 0"]),
    (["resume={run}", "optim._target_=torch.optim.NAdam"], ["optim._target_=torch.optim.NAdam (the run has "
                                                           "torch.optim.AdamW)"]),
    (["resume={run}", "ckpt_path={run}/checkpoints/best.ckpt"], ["resume=", "drop the ckpt_path override"]),
], ids=["explicit-dir", "other-chunks", "other-model", "other-objective", "bad-value", "other-optimizer",
        "resume+ckpt_path"])
def test_nothing_in_an_existing_run_changes_unless_it_is_continued(finished_run, tmp_path, args, expected):
    before = snapshot(finished_run)
    proc = run_py(*(a.format(run=finished_run) for a in args), log_dir=tmp_path)
    assert proc.returncode == 2
    line = one_error_line(proc)
    for part in expected:
        assert part in line, (part, line)
    assert snapshot(finished_run) == before  # not one byte, not one mtime


def test_resume_continues_the_run_in_place_with_its_own_overrides(finished_run, tmp_path):
    run = tmp_path / finished_run.name
    subprocess.run(["cp", "-a", str(finished_run), str(run)], check=True)
    first = json.loads((run / "summary.json").read_text())
    proc = run_py(f"resume={run}", "trainer.max_steps=9", log_dir=tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "elsewhere").exists()  # no new run directory: it went on in place
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and first["steps"] == 6 and summary["steps"] == 9
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert "chunks=2" in overrides and "trainer.max_steps=9" in overrides  # the run's own, then the new one
    assert OmegaConf.load(run / "config.yaml").trainer.max_steps == 9
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 9


def test_a_run_saved_before_the_package_was_regrouped_resumes_and_is_probed(finished_run, tmp_path):
    """Runs written before issue 15 name classes at their old places (locallearn.heads...) and keep the chunk
    plan's boundaries in a ``chunking`` group; they still resume and load."""
    from locallearn.probing.features import load_run

    run = tmp_path / finished_run.name
    subprocess.run(["cp", "-a", str(finished_run), str(run)], check=True)

    def older(cfg: dict) -> dict:
        cfg["chunking"] = {"boundaries": cfg.pop("boundaries"), "greedy": False}
        del cfg["learner"], cfg["interlock"]
        for group, old in (("head", "locallearn.heads."), ("objective", "locallearn.objectives."),
                           ("schedule", "locallearn.schedules.")):
            cfg[group]["_target_"] = old + cfg[group]["_target_"].rsplit(".", 1)[1]
        return cfg

    (run / "config.yaml").write_text(yaml.safe_dump(older(yaml.safe_load((run / "config.yaml").read_text()))))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["hyper_parameters"]["config"] = older(ckpt["hyper_parameters"]["config"])
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, "chunking=chunked"]))
    assert len(load_run(run).net) == 2
    proc = run_py(f"resume={run}", "trainer.max_steps=8", log_dir=tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_an_older_name_for_a_setting_is_one_line_naming_the_new_one(tmp_path):
    proc = run_py("chunking=greedy", log_dir=tmp_path)
    assert proc.returncode == 2
    assert "chunking=greedy is an older name: write variant=greedy" in one_error_line(proc)


def test_a_run_that_is_still_running_cannot_be_resumed(finished_run, tmp_path):
    run = tmp_path / finished_run.name
    subprocess.run(["cp", "-a", str(finished_run), str(run)], check=True)
    assert lock(run)  # this process plays the run that still holds its directory
    before = snapshot(run)
    proc = run_py(f"resume={run}", "trainer.max_steps=9", log_dir=tmp_path)
    assert proc.returncode == 2 and "is still running (another process holds its .lock)" in one_error_line(proc)
    assert snapshot(run) == before


def test_a_run_resumes_with_data_parallel_processes(finished_run, tmp_path):
    run = tmp_path / finished_run.name
    subprocess.run(["cp", "-a", str(finished_run), str(run)], check=True)
    # every further process is started with the first one's (already expanded) command line
    proc = run_py(f"resume={run}", "trainer.max_steps=8", "trainer=ddp", "trainer.accelerator=cpu",
                  "trainer.devices=2", log_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_a_checkpoint_for_another_model_is_refused_with_what_differs(finished_run, make_cfg):
    last = finished_run / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as info:
        build(make_cfg("chunks=4", f"ckpt_path='{last}'"))
    msg = str(info.value)
    assert "\n" not in msg and f"ckpt_path={last} was made for other settings: chunks=4 (the run has 2)" in msg
    with pytest.raises(ConfigError, match="chunks=1 .the run has 2., model.n_layer=2 .the run has 4."):
        build(make_cfg("chunks=1", "model.n_layer=2", f"ckpt_path='{last}'"))
    build(make_cfg("chunks=2", f"ckpt_path='{last}'", "seed=3"))  # another seed or length is fine: fine-tuning


def test_last_ckpt_holds_the_latest_validation_even_when_best_does_not_improve(make_cfg):
    # mode=max keeps the *highest* val loss as "best": the first validation's, never improved on later
    cfg = make_cfg("chunks=2", "trainer.max_steps=8", "trainer.val_check_interval=2",
                   "callbacks.model_checkpoint.mode=max")
    train(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    assert torch.load(ckpts / "best.ckpt", weights_only=False)["global_step"] == 2
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 8
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_disk_that_fills_mid_run_ends_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    proc = run_py("chunks=2", "+callbacks.full._target_=conftest.DiskFullAt", "+callbacks.full.step=4",
                  log_dir=tmp_path, env={"PYTHONPATH": str(PROJECT_ROOT / "tests")})
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error_line(proc)
    (run,) = (tmp_path / "runs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    assert "No space left on device" in line and f"paths.log_dir={tmp_path}" in line
    assert f"{last} (step 3) is intact" in line
    assert torch.load(last, weights_only=False)["global_step"] == 3  # the validation at step 3, whole
    assert not list(run.rglob("*.tmp"))
    for name in ("summary.json", "diagnostics.json"):  # written at the end, when the disk was full: absent, not empty
        assert not (run / name).exists()


def test_an_unwritable_log_dir_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run_py(log_dir=blocker / "logs")
    line = one_error_line(proc)
    assert proc.returncode == 2
    assert f"paths.log_dir={blocker}/logs is not writable (Not a directory" in line
    assert blocker.read_text() == "not a directory"



def test_the_divergence_message_names_the_step_last_ckpt_really_holds(make_cfg):
    # best.ckpt stays at step 2 (mode=max never improves on it); last.ckpt follows every validation, up to step 6
    cfg = make_cfg("chunks=2", "trainer.max_steps=10", "trainer.val_check_interval=2",
                   "callbacks.model_checkpoint.mode=max", "+callbacks.nan._target_=conftest.NanAt",
                   "+callbacks.nan.step=7", "+callbacks.nan.chunk=2")
    with pytest.raises(TrainingDiverged) as info:
        train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert str(info.value).endswith(f"the last good checkpoint is {last} (step 6).")
    assert torch.load(last, weights_only=False)["global_step"] == 6
