"""End-to-end runs through the real Hydra config: outputs, resume, multirun."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from test_dashboards import DEFINING, hparams_table

from locallearn.config import PROJECT_ROOT
from locallearn.runner import train


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_run_writes_summary_events_checkpoints_and_vocab(make_cfg):
    cfg = make_cfg("chunks=2", "mode=sequential")
    summary = train(cfg)
    out = Path(cfg.paths.output_dir)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["status"] == "finished"
    assert on_disk["steps"] == 6 and on_disk["chunks"] == 2
    assert on_disk["layers"] == [[0, 1], [2, 3]]
    assert set(on_disk["val_loss"]) == {"chunk1", "chunk2"}
    assert on_disk["best_val_loss"] <= on_disk["val_loss"]["chunk2"] + 1e-9
    assert on_disk["tokens_seen"] == 6 * 8 * 16
    assert on_disk["activation_bytes_peak"] > 0 and on_disk["tokens_per_s"] > 0
    p = on_disk["parameters"]
    assert p["chunk1"]["trunk"] > p["chunk2"]["trunk"]  # chunk 1 holds the embeddings too
    assert sum(c["trunk"] + c["head"] for c in p.values()) == on_disk["parameters_total"]
    assert summary["val_loss"] == on_disk["val_loss"]
    assert {"best.ckpt", "last.ckpt"} <= {f.name for f in (out / "checkpoints").iterdir()}
    vocab = json.loads((out / "vocab.json").read_text())
    assert len(vocab["tokens"]) == on_disk["vocab_size"]
    resolved = OmegaConf.load(out / "config.yaml")
    assert resolved.data.block_size == 16 and resolved.chunks == 2  # interpolations resolved

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for k in (1, 2):
        assert {f"train/loss/chunk{k}", f"val/loss/chunk{k}", f"val/bits_per_token/chunk{k}",
                f"train/lr/chunk{k}"} <= tags
    assert "train/tokens_per_s" in tags
    # every chunk's curve of one metric on one chart
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: c.multiline.tag for cat in layout.category for c in cat.chart}
    for tag in tags:
        matching = [title for title, regexes in charts.items() if any(re.match(r, tag) for r in regexes)]
        per_chunk = re.match(r"^(train|val)/.*/chunk\d+$", tag) is not None
        assert len(matching) == int(per_chunk), (tag, matching)
    for title, regexes in charts.items():  # and no empty chart
        assert any(re.match(r, tag) for r in regexes for tag in tags), title
    assert len(scalars(out, "train/loss/chunk2")) == 6


@pytest.mark.parametrize(
    "variant",
    [
        [],
        ["objective=span"],  # masks drawn by step
        ["switch.at=0.5", "switch.ewc_lambda=10"],  # the checkpoint at step 3 is the switch step: EWC after resume
        ["schedule=cyclic", "schedule.cycle_steps=4", "optim.hypergrad_lr=1e-4"],  # scheduler and adapted LRs
        ["data=induction", "data.block_size=16", "data.n_symbols=20", "data.segment=4", "data.n_train=500"],  # rows
    ],
    ids=["plain", "span", "switch+ewc", "cyclic+hypergrad", "task"],
)
def test_resume_continues_exactly_where_the_run_stopped(make_cfg, variant):
    straight = make_cfg("chunks=2", "model.dropout=0.1", *variant)
    train(straight)
    crashed = make_cfg("chunks=2", "model.dropout=0.1", *variant, "+callbacks.crash._target_=conftest.CrashAt",
                       "+callbacks.crash.step=4")
    with pytest.raises(RuntimeError, match="planted failure at step 4"):
        train(crashed)
    crashed_dir = Path(crashed.paths.output_dir)
    failed = json.loads((crashed_dir / "summary.json").read_text())
    assert failed["status"].startswith("failed: RuntimeError") and failed["steps"] == 4
    last = crashed_dir / "checkpoints" / "last.ckpt"  # written by the validation at step 3

    resumed = make_cfg("chunks=2", "model.dropout=0.1", *variant, f"ckpt_path={last}")
    summary = train(resumed)
    assert summary["steps"] == 6
    want = scalars(Path(straight.paths.output_dir), "train/loss/chunk2")
    got = scalars(Path(resumed.paths.output_dir), "train/loss/chunk2")
    assert sorted(got) == [3, 4, 5]  # the resumed run logs steps 4..6 only, on the same step axis
    for step, value in got.items():
        assert value == pytest.approx(want[step], rel=1e-6, abs=0), f"step {step + 1} differs after resume"
    straight_summary = json.loads((Path(straight.paths.output_dir) / "summary.json").read_text())
    assert summary["val_loss"] == straight_summary["val_loss"]
    assert summary.get("answer_acc") == straight_summary.get("answer_acc")
    assert "2 usable points" in summary["curve_fit"]["chunk1"]["error"]  # the diagnostics kept the first half's history


@pytest.mark.shared_data
def test_shakespeare_preset_reads_the_shared_corpus(make_cfg):
    cfg = make_cfg("data=shakespeare", "chunks=2", "trainer.max_steps=3", "schedule.warmup_steps=1")
    summary = train(cfg)
    assert summary["vocab_size"] == 65 and summary["status"] == "finished"
    vocab = json.loads((Path(cfg.paths.output_dir) / "vocab.json").read_text())
    assert vocab["data"] == "text" and "\n" in vocab["tokens"] and "z" in vocab["tokens"]


def test_multirun_from_the_command_line(tmp_path):
    cmd = [sys.executable, "run.py", "-m", "chunks=1,2,4", "model=tiny", "data=synthetic", "data.n_train_tokens=20000",
           "data.n_val_tokens=4000", "data.val_windows=16", "trainer.max_steps=4", "trainer.val_check_interval=2",
           "schedule.warmup_steps=1", "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "multiruns").iterdir()
    assert "chunks=1,2,4" in sweep.name
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name.split("_", 1)[0] for j in jobs] == ["0", "1", "2"]
    # TensorBoard's HParams tab on the sweep: every chunk of every job, and the choices that define each
    columns, metrics, sessions = hparams_table(sweep)
    assert {f"hparams/val_loss/chunk{k}" for k in (1, 2, 3, 4)} <= metrics and DEFINING <= columns
    assert sorted(h["chunks"].number_value for h in sessions.values()) == [1, 2, 4]
    for job, k in zip(jobs, (1, 2, 4)):
        assert f"chunks={k}" in job.name
        summary = json.loads((job / "summary.json").read_text())
        assert summary["chunks"] == k and summary["steps"] == 4
        assert (job / ".hydra" / "config.yaml").is_file()  # the resolved config is saved with every run


def test_a_local_run_on_a_task_ends_with_its_answers_by_depth_and_its_end_to_end_command(tmp_path):
    cmd = [sys.executable, "run.py", "data=induction", "model=tiny", "data.block_size=16", "data.n_symbols=20",
           "data.segment=4", "data.n_train=500", "data.val_windows=16", "chunks=2", "overlap=1",
           "trainer.max_steps=4", "trainer.val_check_interval=2", "schedule.warmup_steps=1",
           "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert re.search(r"final answer accuracy: chunk1 \(depth 2\) [\d.]+%, chunk2 \(depth 4\) [\d.]+% \(chance 5\.0%\)",
                     log), log[-2000:]
    assert re.search(r"what depth bought in this run: [+-][\d.]+% answer accuracy from chunk 1 \(2 block\(s\), "
                     r"[\d.]+%\) to the last chunk \(4 blocks, [\d.]+%\)", log), log[-2000:]
    line = next(x for x in log.splitlines() if "its end-to-end reference" in x)
    command, compare = line.split(": ", 1)[1].split(" ; then compare the two: ")
    assert command.startswith("python run.py data=induction model=tiny") and command.endswith(" chunks=1")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert compare == f"python analysis/compare.py {run_dir} <its run dir>"
    assert "chunks=2" not in command and "overlap=1" not in command and "paths.log_dir" in command
