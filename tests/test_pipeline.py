"""mode=pipeline (one process per chunk) and trainer=ddp (data parallel): same updates as one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from locallearn.config import PROJECT_ROOT
from locallearn.errors import ConfigError
from locallearn.runner import build, train
from tests.conftest import TINY


def checkpoint(cfg) -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)


def train_losses(cfg, k: int) -> dict[int, float]:
    acc = EventAccumulator(str(Path(cfg.paths.output_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(f"train/loss/chunk{k}")}


def assert_same_state(a: dict, b: dict, atol=1e-6):
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=atol, msg=f"{name} differs")
    for i, state in a["optimizer_states"][0]["state"].items():  # Adam's moments: every chunk's, pulled in
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b["optimizer_states"][0]["state"][i][key], state[key], rtol=0, atol=atol)


# K=4 holds more train results in flight than a chunk may queue: it deadlocked at the first validation once.
TASK = ["data=induction", "data.block_size=16", "data.n_symbols=20", "data.segment=4", "data.n_train=500"]


@pytest.mark.parametrize("chunks, extra", [pytest.param(2, [], marks=pytest.mark.slow),
                                           pytest.param(3, [], marks=pytest.mark.slow), (4, []),
                                           (2, ["objective=span"]), (3, TASK)],  # K=2, 3: 2-span, 3-task by default
                         ids=["2", "3", "4", "2-span", "3-task"])
def test_pipeline_makes_the_updates_of_sequential(make_cfg, chunks, extra):
    seq = make_cfg(f"chunks={chunks}", "mode=sequential", *extra)
    pipe = make_cfg(f"chunks={chunks}", "mode=pipeline", *extra)
    threads = torch.get_num_threads()
    seq_summary, pipe_summary = train(seq), train(pipe)
    assert torch.get_num_threads() == threads  # the pipeline gives back the threads it set
    assert pipe_summary["val_loss"] == pytest.approx(seq_summary["val_loss"], abs=1e-6)
    if extra == TASK:  # every chunk's answer metrics travel back from its process
        assert pipe_summary["answer_acc"] == pytest.approx(seq_summary["answer_acc"], abs=1e-6)
        assert pipe_summary["answer_loss"] == pytest.approx(seq_summary["answer_loss"], abs=1e-5)
    assert_same_state(checkpoint(seq), checkpoint(pipe))
    for k in range(1, chunks + 1):  # every chunk's train loss reaches TensorBoard at its own step
        want, got = train_losses(seq, k), train_losses(pipe, k)
        assert sorted(got) == sorted(want) == list(range(6))
        assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], abs=1e-6)
    assert len(pipe_summary["activation_bytes_per_process"]) == chunks


def test_a_pipeline_run_resumes_exactly(make_cfg):
    straight = make_cfg("chunks=2", "mode=pipeline", "schedule=cyclic", "schedule.cycle_steps=4")
    train(straight)
    crashed = make_cfg("chunks=2", "mode=pipeline", "schedule=cyclic", "schedule.cycle_steps=4",
                       "+callbacks.crash._target_=conftest.CrashAt", "+callbacks.crash.step=4")
    with pytest.raises(RuntimeError, match="planted failure at step 4"):
        train(crashed)
    last = Path(crashed.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = make_cfg("chunks=2", "mode=pipeline", "schedule=cyclic", "schedule.cycle_steps=4", f"ckpt_path={last}")
    train(resumed)
    assert_same_state(checkpoint(straight), checkpoint(resumed))
    # and a pipeline checkpoint resumes in sequential mode too
    sequential = make_cfg("chunks=2", "mode=sequential", "schedule=cyclic", "schedule.cycle_steps=4",
                          f"ckpt_path={last}")
    train(sequential)
    assert_same_state(checkpoint(straight), checkpoint(sequential))


def test_a_dead_chunk_process_stops_the_run_naming_it_and_keeps_the_checkpoint(tmp_path):
    steps = ["trainer.max_steps=100000", "trainer.val_check_interval=5", "schedule=constant"]
    tiny = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check", "schedule."))]
    cmd = [sys.executable, "run.py", "chunks=2", "mode=pipeline", *tiny, *steps, f"paths.log_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid, lines = None, []
    for line in proc.stdout:  # the driver names each chunk's process
        lines.append(line)
        if "pipeline: chunk 2 runs in process" in line:
            pid = int(line.split("runs in process ")[1].split()[0])
            break
    assert pid is not None, "".join(lines)
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 1, out
    assert "Traceback" not in out
    (error,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert error.startswith(f"error: chunk 2's process (rank 1, pid {pid}) was killed by signal 9 at or after step")
    assert "the other processes were stopped; the last checkpoint" in error and "is intact." in error
    (run_dir,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] % 5 == 0 and ckpt["global_step"] > 0
    assert json.loads((run_dir / "summary.json").read_text())["status"].startswith("failed: PipelineError: chunk 2")


@pytest.mark.parametrize("overrides, message", [
    (["chunks=2", "overlap=1"], "overlap=1 trains blocks of the previous chunk, which live in another process"),
    (["chunks=2", "interlock=2"], "interlock=2 trains the blocks of earlier chunks, which live in other processes"),
    (["chunks=2", "switch.at=0.5"], "switch.at=0.5 needs gradients across chunks"),
    (["chunks=2", "optim.hypergrad_lr=1e-6"], "optim.hypergrad_lr=1e-06 is not supported with mode=pipeline"),
    (["chunks=2", "trainer.precision=16-mixed"], "trainer.precision=16-mixed is not supported with mode=pipeline"),
    (["chunks=2", "trainer.devices=2"], "trainer.devices=2 asks Lightning for data parallelism too"),
    (["chunks=2", "pipeline.backend=mpi"], "pipeline.backend=mpi must be one of gloo, nccl"),
    (["chunks=2", "pipeline.backend=nccl", "trainer.accelerator=cpu"],
     "pipeline.backend=nccl moves tensors between GPUs"),
])
def test_what_cannot_run_as_a_pipeline_is_refused(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as e:
        build(make_cfg("mode=pipeline", *overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_torchrun_starts_one_process_per_chunk(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "run.py", "chunks=2", "mode=pipeline",
           *TINY, f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()  # rank 1 makes no run directory of its own
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert len(summary["activation_bytes_per_process"]) == 2


def test_torchrun_with_the_wrong_number_of_processes_is_refused(make_cfg, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=3 with chunks=2; launch torchrun --nproc_per_node=2"):
        build(make_cfg("mode=pipeline", "chunks=2"))


# joint and sequential with clm: the same code paths as with mlm and span masks, so they run with -m slow only
@pytest.mark.parametrize("mode, objective, method", [pytest.param("joint", "clm", "local", marks=pytest.mark.slow),
                                                     pytest.param("sequential", "clm", "local", marks=pytest.mark.slow),
                                                     ("joint", "mlm", "local"), ("sequential", "span", "local"),
                                                     ("sequential", "clm", "delayed"), ("joint", "clm", "synthetic")],
                         ids=["joint", "sequential", "joint-mlm", "sequential-span", "delayed", "synthetic"])
def test_ddp_with_two_processes_matches_one_process_with_the_combined_batch(make_cfg, mode, objective, method):
    # mlm/span: each rank masks its rows of the combined batch, and weights its mean loss by its share of
    # the combined batch's targets, so the averaged gradient is the combined batch's. A method's messages and
    # predictors are per rank, in units of the rank's batch, so the averaged gradients are the combined batch's too.
    run = ("chunks=2", f"mode={mode}", f"objective={objective}", f"method={method}")
    single_cfg = make_cfg(*run, "data.batch_size=8")
    single = build(single_cfg)
    single.trainer.fit(single.module, datamodule=single.datamodule)
    ddp_cfg = make_cfg(*run, "data.batch_size=4", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                       "trainer.strategy.start_method=spawn")
    ddp = build(ddp_cfg)
    ddp.trainer.fit(ddp.module, datamodule=ddp.datamodule)
    moved = False
    for (name, a), b, start in zip(single.module.net.named_parameters(), ddp.module.net.parameters(),
                                   build(make_cfg(*run)).module.net.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=f"{name} differs")
        moved |= not torch.equal(a, start)
    assert moved
    for k in (1, 2):  # and the logged train loss is the combined batch's, not rank 0's share of it
        want, got = train_losses(single_cfg, k), train_losses(ddp_cfg, k)
        assert sorted(got) == sorted(want) == list(range(6))
        assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], abs=1e-5)


def test_lightnings_own_ddp_is_refused(make_cfg):
    with pytest.raises(ConfigError, match=r"trainer.strategy=ddp wraps the model in DistributedDataParallel"):
        build(make_cfg("+trainer.strategy=ddp"))


@pytest.mark.slow  # 45 s of fresh processes, the second slowest test: the default suite stays under 10 minutes
def test_bench_runs_on_the_tiny_model_and_writes_its_table(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "analysis/bench.py", "--chunks", "1", "2", "--modes", "sequential",
                           "pipeline", "--steps", "3", "--warmup", "1", "--repeats", "1", "--set", "model=tiny",
                           "--methods", "delayed", "--out", str(out)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    profiles = result["profiles"]  # where the eager step's time goes, K=1 and the largest K
    assert [(p["mode"], p["chunks"]) for p in profiles] == [("profile sequential", 1), ("profile sequential", 2)]
    for p in profiles:
        assert 0 < p["library_share"] < 1 and p["ms_per_step"]["matmul"] > 0 and p["ms_per_step"]["attention"] > 0
        assert sum(p["ms_per_step"].values()) == pytest.approx(p["total_ms"])
    assert "| profile sequential | 2 |" in proc.stdout
    steps = result["interleaved"]["step_ms"]  # K=1, K=2 and K=2 with the method stepped in turn in one process
    assert len(steps) == 3 and result["interleaved"]["ratio_to_first"] == pytest.approx([1, *(s / steps[0]
                                                                                              for s in steps[1:])])
    assert "K=2 / K=1 stepped in turn in one process" in proc.stdout
    assert "method=delayed K=2 / K=1 stepped in turn in one process" in proc.stdout
    assert [(r["mode"], r["chunks"]) for r in rows] == [("bare joint", 1), ("sequential", 1), ("sequential", 2),
                                                       ("pipeline", 2), ("sequential, method=delayed", 2),
                                                       ("sequential, 1 thread", 2)]
    assert all("error" not in r and r["step_ms"] > 0 and r["activation_bytes"] > 0 for r in rows)
    delayed = rows[4]  # holds chunk 1's input (token ids) and its message between steps
    assert delayed["method_state_bytes"] > 0 and rows[2]["method_state_bytes"] == 0
    assert "| sequential | 2 |" in proc.stdout and "| pipeline K=2 / sequential K=2 tokens/s |" in proc.stdout
