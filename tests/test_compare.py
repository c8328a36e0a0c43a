"""Sweep reports: grouping over seeds, means, stds, gaps to end-to-end, failed and unfinished runs."""

import json
import math
import subprocess
import sys
from statistics import mean, stdev

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from locallearn.analysis.compare import markdown, table_rows, write_report
from locallearn.analysis.sweeps import collect, groups
from locallearn.config import PROJECT_ROOT
from tests.conftest import tiny_args


def even_plan(K: int, blocks: int = 4) -> list[list[int]]:
    """Blocks per chunk of K balanced chunks (a 4-block model unless K is larger)."""
    blocks = max(blocks, K)
    return [list(range(k * blocks // K, (k + 1) * blocks // K)) for k in range(K)]


def fake_run(root, job: int, overrides: list[str], losses=None, status="finished", wall=100.0, curve=None,
             layers=None, answer_acc=None, answer_curve=None):
    """A job directory as a multirun leaves it: .hydra/overrides.yaml, summary.json, TensorBoard events."""
    d = root / f"{job}_{','.join(overrides)}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides + ["trainer.enable_progress_bar=false"]))
    if status is None:  # still running, or killed: no summary yet
        return d
    seed = int(next((o.split("=")[1] for o in overrides if o.startswith("seed=")), 0))
    summary = {"status": status, "config": {"seed": seed}, "steps": 0 if losses is None else 100}
    if losses is not None:
        summary |= {"val_loss": {f"chunk{k + 1}": v for k, v in enumerate(losses)}, "wall_time_s": wall,
                    "tokens_per_s": 1000.0, "activation_bytes_peak": 2**20 * len(losses),
                    "layers": layers or even_plan(len(losses))}
    if answer_acc is not None:
        summary["answer_acc"] = {f"chunk{k + 1}": v for k, v in enumerate(answer_acc)}
    (d / "summary.json").write_text(json.dumps(summary))
    if curve or answer_curve:
        with SummaryWriter(str(d / "tb")) as w:
            for step, value in curve or []:
                w.add_scalar("val/loss", value, step)
            for step, value in answer_curve or []:
                w.add_scalar("val/answer_acc", value, step)
    return d


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    e2e = [2.00, 2.02, 2.04]
    local = [(2.10, 2.08), (2.12, 2.10), (2.14, 2.09)]
    job = 0
    for seed in range(3):
        fake_run(root, job, ["chunks=1", f"seed={seed}"], [e2e[seed]], curve=[(10, 3.0), (20, e2e[seed])])
        fake_run(root, job + 1, ["chunks=2", f"seed={seed}"], list(local[seed]), wall=80.0 + seed,
                 curve=[(10, 3.1), (20, local[seed][-1])])
        job += 2
    fake_run(root, job, ["chunks=4", "seed=0"], status="failed: RuntimeError: loss is nan at step 7")
    fake_run(root, job + 1, ["chunks=4", "seed=1"], status=None)
    return root, e2e, local


def test_groups_means_stds_and_gaps(sweep):
    root, e2e, local = sweep
    records = collect([root])
    assert len(records) == 8
    gs = groups(records)
    assert [dict(g.key)["chunks"] for g in gs] == ["1", "2", "4"]  # the seed is not part of a group
    rows = {r["chunks"]: r for r in table_rows(gs)}
    assert rows[1]["seeds"] == 3 and rows[1]["last_mean"] == pytest.approx(mean(e2e))
    assert rows[1]["last_std"] == pytest.approx(stdev(e2e))
    last = [c[-1] for c in local]
    assert rows[2]["last_mean"] == pytest.approx(mean(last)) and rows[2]["last_std"] == pytest.approx(stdev(last))
    first = [c[0] for c in local]
    assert rows[2]["val_loss_per_chunk"][0] == pytest.approx([mean(first), stdev(first)])
    assert rows[2]["gap"] == pytest.approx(mean(last) - mean(e2e))
    assert rows[2]["gap_pct"] == pytest.approx(100 * (mean(last) - mean(e2e)) / mean(e2e))
    assert rows[2]["e2e_group"] == "chunks=1"
    assert rows[2]["wall_s"] == pytest.approx(81.0) and rows[2]["peak_memory_mb"] == pytest.approx(2.0)
    assert rows[4]["seeds"] == 0 and rows[4]["runs"] == 2 and rows[4]["last_mean"] is None


def test_report_lists_failed_and_unfinished_runs_and_writes_figures(sweep, tmp_path):
    root, e2e, _ = sweep
    out = tmp_path / "report"
    write_report([root], out)
    md = (out / "compare.md").read_text()
    assert "failed: RuntimeError: loss is nan at step 7" in md and ": unfinished" in md
    assert "Not included (2 runs)" in md
    assert f"**{mean(e2e):.4f} ± {stdev(e2e):.4f}**" in md
    for name in ("compare.csv", "runs.csv", "val_curves.png", "loss_by_depth.png", "loss_vs_wall.png"):
        assert (out / name).stat().st_size > 0, name
    assert len((out / "runs.csv").read_text().strip().splitlines()) == 1 + 8


def test_one_seed_has_no_std(tmp_path):
    root = tmp_path / "m"
    fake_run(root, 0, ["chunks=1"], [2.0])
    (row,) = table_rows(groups(collect([root])))
    assert row["last_mean"] == 2.0 and math.isnan(row["last_std"])


def test_a_failed_job_does_not_stop_the_sweep_and_is_reported(tmp_path):
    """chunks=9 is refused on the 4-block model; the sweep still runs chunks=1, and the report lists the failure."""
    cmd = [sys.executable, "run.py", "-m", *tiny_args("chunks=9,1"), f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr  # the sweep finished; the refused job is recorded, not fatal
    assert "error: chunks=9 exceeds model.n_layer=4" in proc.stderr
    (sweep_dir,) = (tmp_path / "multiruns").iterdir()
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(jobs) == 2
    good = json.loads((jobs[1] / "summary.json").read_text())
    assert good["status"] == "finished" and good["val_loss"]
    bad = json.loads((jobs[0] / "summary.json").read_text())
    assert bad["status"].startswith("failed: ConfigError: chunks=9")
    proc = subprocess.run([sys.executable, "analysis/compare.py", str(sweep_dir)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Not included (1 run)" in proc.stdout and "failed: ConfigError: chunks=9" in proc.stdout
    assert "| chunks=1 | 1/1 |" in proc.stdout


def test_a_job_that_crashes_while_training_leaves_the_others_and_its_record(tmp_path):
    cmd = [sys.executable, "run.py", "-m", "+callbacks.crash._target_=tests.conftest.CrashAt",
           "+callbacks.crash.step=2,1000", *tiny_args(), f"paths.log_dir={tmp_path}"]  # step 1000: never reached
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "planted failure at step 2" in proc.stderr  # Hydra reports it at the end
    (sweep_dir,) = (tmp_path / "multiruns").iterdir()
    statuses = [json.loads((j / "summary.json").read_text())["status"]
                for j in sorted(p for p in sweep_dir.iterdir() if p.is_dir())]
    assert statuses[0].startswith("failed: RuntimeError: planted failure at step 2") and statuses[1] == "finished"
    _, records = write_report([sweep_dir], tmp_path / "report")
    assert [r.finished for r in records] == [False, True]
    assert "planted failure at step 2" in (tmp_path / "report" / "compare.md").read_text()


def test_gap_is_taken_to_the_end_to_end_run_of_the_same_model(tmp_path):
    root = tmp_path / "m"
    fake_run(root, 0, ["chunks=1", "model=small"], [2.0])
    fake_run(root, 1, ["chunks=1", "model=base"], [1.5])
    fake_run(root, 2, ["chunks=4", "model=base", "overlap=1"], [1.7, 1.6, 1.6, 1.6])
    fake_run(root, 3, ["variant=greedy", "model=small"], [2.3, 2.2, 2.2, 2.1])
    rows = {r["group"]: r for r in table_rows(groups(collect([root])))}
    assert rows["chunks=4 model=base overlap=1"]["gap"] == pytest.approx(0.1)
    assert rows["model=small variant=greedy"]["gap"] == pytest.approx(0.1)
    assert rows["model=small variant=greedy"]["e2e_group"] == "chunks=1 model=small"


# variant -> blocks per chunk, in a 4-block model (the depth_benefit recipes)
PLANS = {"end_to_end": [[0, 1, 2, 3]], "shallow2": [[0, 1]], "shallow1": [[0]], "chunks2": [[0, 1], [2, 3]],
         "chunked": [[0], [1], [2], [3]], "delayed": [[0], [1], [2], [3]], "synthetic": [[0], [1], [2], [3]]}


def depth_sweep(root, values: dict[str, list[float]], accs: dict[str, list[float]] | None = None):
    """A fake depth_benefit sweep: one run per variant and seed, final last-chunk loss ``values[variant][seed]``."""
    job = 0
    for variant, per_seed in values.items():
        for seed, v in enumerate(per_seed):
            K = len(PLANS[variant])
            acc = [0.0] * (K - 1) + [accs[variant][seed]] if accs else None
            fake_run(root, job, [f"variant={variant}", "data=mqar", f"seed={seed}"], [9.0] * (K - 1) + [v],
                     layers=PLANS[variant], answer_acc=acc)
            job += 1
    return root


def test_share_of_the_depth_benefit_kept_by_hand(tmp_path):
    from locallearn.analysis.depth_benefit import rows

    losses = {"end_to_end": [1.0, 1.1, 1.2], "shallow2": [2.0, 2.1, 2.2], "shallow1": [3.0, 3.1, 3.2],
              "chunks2": [1.5, 1.35, 1.7], "chunked": [2.0, 2.1, 2.2]}
    accs = {"end_to_end": [1.0, 1.0, 0.9], "shallow2": [0.1, 0.2, 0.1], "shallow1": [0.05, 0.05, 0.05],
            "chunks2": [0.55, 0.6, 0.5], "chunked": [0.05, 0.05, 0.05]}
    found = {dict(r.local.key)["variant"]: r for r in rows(groups(collect([depth_sweep(tmp_path / "m", losses,
                                                                                          accs)])))}
    assert set(found) == {"chunks2", "chunked"}
    k2 = found["chunks2"]
    assert dict(k2.e2e.key)["variant"] == "end_to_end" and dict(k2.shallow.key)["variant"] == "shallow2"
    # (S - local) / (S - E) per seed: (2.0-1.5)/(2.0-1.0), (2.1-1.35)/(2.1-1.1), (2.2-1.7)/(2.2-1.2)
    assert k2.results["loss"].values == pytest.approx([0.5, 0.75, 0.5])
    assert k2.results["loss"].mean == pytest.approx(0.5833333)
    lo, hi = k2.results["loss"].interval()
    half = 4.302653 * stdev([0.5, 0.75, 0.5]) / math.sqrt(3)  # Student t, 2 degrees of freedom, 97.5%
    assert (lo, hi) == pytest.approx((0.5833333 - half, 0.5833333 + half))
    # on accuracy: (local - S) / (E - S): (0.55-0.1)/0.9, (0.6-0.2)/0.8, (0.5-0.1)/0.8
    assert k2.results["answer_acc"].values == pytest.approx([0.5, 0.5, 0.5])
    k4 = found["chunked"]
    assert dict(k4.shallow.key)["variant"] == "shallow1"
    assert k4.results["loss"].values == pytest.approx([0.5, 0.5, 0.5])  # (3.0-2.0)/(3.0-1.0) ...
    assert k4.results["answer_acc"].values == pytest.approx([0.0, 0.0, 0.0])  # no better than one block
    out = tmp_path / "report"
    write_report([tmp_path / "m"], out)
    md = (out / "compare.md").read_text()
    assert "| variant=chunks2 | 2 | 4 (2) | 2.1000 / 1.1000 / 1.5167 | 58% [" in md
    assert (out / "kept_by_chunks.png").stat().st_size > 0


def test_kept_is_not_reported_where_depth_buys_nothing(tmp_path):
    from locallearn.analysis.depth_benefit import rows

    losses = {"end_to_end": [2.0, 2.1, 1.9], "shallow2": [2.01, 2.05, 1.98], "chunks2": [2.0, 2.0, 2.0]}
    root = depth_sweep(tmp_path / "m", losses)
    (row,) = rows(groups(collect([root])))
    assert not row.results["loss"].clear  # the benefit (0.01, -0.05, 0.08) is not above 0 with 95% confidence
    out = tmp_path / "report"
    write_report([root], out)
    md = (out / "compare.md").read_text()
    assert "## Share of the depth benefit kept" in md and "n/a: depth buys nothing measurable" in md


def test_steps_to_an_answer_accuracy_is_read_from_the_mean_curve_over_seeds(tmp_path):
    root = tmp_path / "m"
    for seed, curve in enumerate(([(499, 0.5), (999, 0.97), (1499, 0.99)], [(499, 0.9), (999, 0.94), (1499, 1.0)])):
        fake_run(root, seed, ["chunks=1", "data=induction", f"seed={seed}"], [1.0], answer_acc=[curve[-1][1]],
                 answer_curve=curve)
    (g,) = groups(collect([root]))
    assert g.steps_to(0.95) == 1000 and g.steps_to(0.999) is None  # means 0.70, 0.955, 0.995
    write_report([root], tmp_path / "r")
    assert "| 1000 |" in (tmp_path / "r" / "compare.md").read_text()
    assert (tmp_path / "r" / "answer_curves.png").stat().st_size > 0


def test_an_override_that_restates_the_recipes_value_still_finds_the_reference(tmp_path):
    """A reference swept with trainer.max_steps=4000 serves runs swept without it when their config trains 4,000
    steps too (read from config.yaml), and not when it trains another number."""
    from locallearn.analysis.depth_benefit import rows

    root = depth_sweep(tmp_path / "m", {"end_to_end": [1.0, 1.1], "shallow1": [3.0, 3.1], "chunked": [2.0, 2.1]})
    for run in root.iterdir():
        (run / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": 4000}}))
        if "chunked" not in run.name:  # the references were swept with the override
            overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
            (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides + ["trainer.max_steps=4000"]))
    (row,) = rows(groups(collect([root])))
    assert row.results["loss"].values == pytest.approx([0.5, 0.5])
    for run in root.iterdir():
        if "chunked" in run.name:
            (run / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": 2000}}))
    assert rows(groups(collect([root]))) == []


def test_text_sweeps_of_two_tokenizers_compare_by_bits_per_character(tmp_path):
    root = tmp_path / "multirun"
    for job, (tok, bpc) in enumerate([("char", 2.40), ("bpe", 2.30)]):
        d = fake_run(root, job, ["chunks=1", f"data.tokenizer={tok}"], [1.66 if tok == "char" else 3.9])
        summary = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps(summary | {"val_bpc": {"chunk1": bpc}}))
    rows = {r["group"]: r for r in table_rows(groups(collect([root])))}
    assert rows["chunks=1 data.tokenizer=bpe"]["last_bpc_mean"] == pytest.approx(2.30)
    md = markdown(groups(collect([root])), collect([root]))
    assert "| last chunk, bits per char |" in md and "| 2.3000 |" in md and "| 2.4000 |" in md
