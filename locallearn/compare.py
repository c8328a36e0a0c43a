"""Sweep reports: group runs by their overrides except the seed, and compare each group with end-to-end.

:func:`collect` reads run and multirun directories (``summary.json``, ``.hydra/overrides.yaml`` and the
TensorBoard validation curve of each run), :func:`groups` aggregates over seeds, :func:`write_report`
writes ``compare.md``, ``compare.csv`` and the figures. ``analysis/compare.py`` is the command line.
A failed or unfinished run never stops a report: it is listed with its status.
"""

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev

import yaml

from locallearn.atomic import atomic_open, write_text
from locallearn.errors import ConfigError

# Overrides that do not change what a run computes (or are the seed itself): not part of a group's identity.
IGNORED = ("seed", "trainer.enable_progress_bar", "ckpt_path", "paths", "hydra")
# Overrides that say how a model is cut into chunks: the matching end-to-end group differs in these only.
LOCAL_KEYS = ("chunks", "chunking", "overlap", "head", "loss_weights", "switch", "mode", "variant")


def under(key: str, names) -> bool:
    """Whether ``key`` is one of ``names`` or inside one of them ("switch.at" is under "switch")."""
    return any(key == n or key.startswith(n + ".") or key.startswith(n + "/") for n in names)


@dataclass
class RunRecord:
    dir: Path
    overrides: dict[str, str]  # key -> value, as given on the command line (or by an experiment)
    status: str  # "finished", "failed: ...", or "unfinished" (no summary.json yet)
    summary: dict = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, last chunk's val loss)
    answer_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, its answer accuracy): tasks

    @property
    def finished(self) -> bool:
        return self.status == "finished" and bool(self.summary.get("val_loss"))

    @property
    def seed(self):
        return self.summary.get("config", {}).get("seed", self.overrides.get("seed"))


def report_dir(first: Path, name: str) -> Path:
    """Where a report of ``first`` goes by default: ``<multirun dir>/<name>``, or beside a single run
    (``<run dir>_<name>``), never inside a run directory (a run directory changes only through its run)."""
    first = Path(first)
    return first.with_name(f"{first.name}_{name}") if _is_run(first) else first / name


def _is_run(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / "summary.json").is_file()


def collect(paths) -> list[RunRecord]:
    """Every run in ``paths`` (run directories, or multirun directories holding job directories)."""
    records = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ConfigError(f"{path} is not a directory; pass run or multirun directories.")
        dirs = [path] if _is_run(path) else sorted((p for p in path.iterdir() if p.is_dir() and _is_run(p)),
                                                    key=job_order)
        if not dirs:
            raise ConfigError(f"{path} holds no run (no summary.json or .hydra/ in it or in its subdirectories); "
                              f"pass a run directory or a multirun directory.")
        records += [read_run(d) for d in dirs]
    return records


def job_order(p: Path):
    """Sweep jobs in their order (``<num>_<overrides>``), then other directories by name."""
    head = p.name.split("_", 1)[0]
    return (int(head), p.name) if head.isdigit() else (1 << 30, p.name)


def read_run(run_dir: Path) -> RunRecord:
    overrides = {}
    path = run_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        for item in yaml.safe_load(path.read_text()) or []:
            key, _, value = item.lstrip("+~").partition("=")
            if not under(key, IGNORED):
                overrides[key] = value
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return RunRecord(run_dir, overrides, "unfinished")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as e:
        return RunRecord(run_dir, overrides, f"failed: unreadable summary.json ({e.msg})")
    curves = read_curves(run_dir, ("val/loss", "val/answer_acc"))
    return RunRecord(run_dir, overrides, summary.get("status", "unfinished"), summary, curves["val/loss"],
                     curves["val/answer_acc"])


def read_curves(run_dir: Path, tags=("val/loss",)) -> dict[str, list[tuple[int, float]]]:
    """Tag -> (step, value) of scalars in the run's TensorBoard events (empty for a tag the run never logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {tag: {} for tag in tags}
    for events in sorted((run_dir / "tb").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in set(tags) & set(acc.Tags().get("scalars", [])):
            points[tag].update({e.step: e.value for e in acc.Scalars(tag)})  # a resumed run: later files win
    return {tag: sorted(p.items()) for tag, p in points.items()}


def read_curve(run_dir: Path, tag: str = "val/loss") -> list[tuple[int, float]]:
    """(step, value) of one scalar in the run's TensorBoard events (the last chunk's val loss by default)."""
    return read_curves(run_dir, (tag,))[tag]


def group_key(overrides: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(overrides.items()))


def label(key, common=()) -> str:
    return " ".join(f"{k}={v}" for k, v in key if (k, v) not in common) or "(defaults)"


def common_items(all_groups) -> set:
    """Overrides shared by every group: said once above a table instead of on every row."""
    if len(all_groups) < 2:
        return set()
    return set.intersection(*(set(g.key) for g in all_groups))


@dataclass
class Group:
    key: tuple
    runs: list[RunRecord]

    @property
    def done(self) -> list[RunRecord]:
        return [r for r in self.runs if r.finished]

    @property
    def chunks(self) -> int:
        return len(self.done[0].summary["val_loss"]) if self.done else int(dict(self.key).get("chunks", 0) or 0)

    def stat(self, fn) -> tuple[float, float] | None:
        """Mean and standard deviation over seeds of ``fn(summary)`` (std is nan with one seed)."""
        values = [v for v in (fn(r.summary) for r in self.done) if v is not None]
        if not values:
            return None
        return mean(values), (stdev(values) if len(values) > 1 else math.nan)

    def chunk_losses(self) -> list[tuple[float, float]]:
        if not self.done:
            return []
        return [self.stat(lambda s, k=k: s["val_loss"].get(f"chunk{k + 1}")) for k in range(self.chunks)]

    def last(self) -> tuple[float, float] | None:
        return self.stat(lambda s: list(s["val_loss"].values())[-1])

    def steps_to(self, accuracy: float) -> int | None:
        """The first validation step at which the mean answer accuracy over seeds reaches ``accuracy`` (tasks)."""
        curves = [dict(r.answer_curve) for r in self.done if r.answer_curve]
        if not curves:
            return None
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        return next((s + 1 for s in steps if mean(c[s] for c in curves) >= accuracy), None)

    def chunk_answer_acc(self) -> list[tuple[float, float] | None]:
        """Mean and std over seeds of each chunk's answer accuracy (tasks; empty for corpora)."""
        if not self.done or not self.done[0].summary.get("answer_acc"):
            return []
        return [self.stat(lambda s, k=k: (s.get("answer_acc") or {}).get(f"chunk{k + 1}")) for k in range(self.chunks)]


def groups(records: list[RunRecord]) -> list[Group]:
    by_key: dict[tuple, list[RunRecord]] = {}
    for r in records:
        by_key.setdefault(group_key(r.overrides), []).append(r)
    return sorted((Group(k, v) for k, v in by_key.items()), key=lambda g: (_sortable(g.key)))


def _sortable(key):
    return tuple((k, (0, float(v), "") if _is_number(v) else (1, 0.0, v)) for k, v in key)


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def blocks(group: Group) -> int | None:
    """Blocks of the model the group trains (from its summaries)."""
    layers = group.done[0].summary.get("layers") if group.done else None
    return sum(len(c) for c in layers) if layers else None


def end_to_end_for(group: Group, all_groups: list[Group], depth: int | None = None) -> Group | None:
    """The group with the same settings but no local learning (chunks=1 and none of the chunk settings) and a
    model of ``depth`` blocks (default: the group's own; a variant may set the depth, so it is read from the
    summaries, not from the overrides)."""
    if group.chunks == 1 and depth is None:
        return None
    depth = blocks(group) if depth is None else depth
    rest = _settings(group)
    for g in all_groups:
        if g is not group and g.chunks == 1 and g.done and blocks(g) == depth and _settings(g) == rest:
            return g
    return None


def _settings(group: Group) -> dict[str, str]:
    """A group's overrides less the chunk settings and the depth (an end-to-end reference differs in those)."""
    return {k: v for k, v in group.key if not under(k, LOCAL_KEYS) and k != "model.n_layer"}


def table_rows(all_groups: list[Group]) -> list[dict]:
    """One row per group: the numbers of the report (means and stds over seeds)."""
    rows = []
    for g in all_groups:
        last = g.last()
        e2e = end_to_end_for(g, all_groups)
        ref = e2e.last() if e2e else None
        gap = (last[0] - ref[0]) if last and ref else None
        mem = g.stat(lambda s: s.get("cuda_peak_allocated_bytes") or s.get("activation_bytes_peak"))
        wall = g.stat(lambda s: s.get("wall_time_s"))
        tps = g.stat(lambda s: s.get("tokens_per_s"))
        rows.append({
            "group": label(g.key), "chunks": g.chunks, "seeds": len(g.done), "runs": len(g.runs),
            "val_loss_per_chunk": [list(c) if c else None for c in g.chunk_losses()],
            "answer_acc_per_chunk": [list(c) if c else None for c in g.chunk_answer_acc()] or None,
            "steps_to_95pct_answer_acc": g.steps_to(0.95),
            "last_mean": last[0] if last else None, "last_std": last[1] if last else None,
            "e2e_group": label(e2e.key) if e2e else None,
            "gap": gap, "gap_pct": 100 * gap / ref[0] if gap is not None else None,
            "peak_memory_mb": mem[0] / 2**20 if mem else None,
            "wall_s": wall[0] if wall else None, "tokens_per_s": tps[0] if tps else None,
        })
    return rows


def _pm(mean_std, digits=4) -> str:
    if not mean_std:
        return "-"
    m, s = mean_std
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")


def markdown(all_groups: list[Group], records: list[RunRecord]) -> str:
    from locallearn import depth_benefit

    rows = table_rows(all_groups)
    common = common_items(all_groups)
    answers = any(r["answer_acc_per_chunk"] for r in rows)
    lines = [f"All runs: {label(sorted(common))}.", ""] if common else []
    lines += ["| group | seeds | val loss per chunk (mean ± std) | last chunk | gap to end-to-end | "
              + ("answer accuracy per chunk | steps to 95% | " if answers else "")
              + "peak act. memory | wall time | tokens/s |", "| --- " * (10 if answers else 8) + "|"]
    for g, r in zip(all_groups, rows):
        per_chunk = ", ".join(_pm(c) for c in g.chunk_losses()) or "-"
        gap = "-" if r["gap"] is None else f"{r['gap']:+.4f} ({r['gap_pct']:+.2f}%)"
        gap = "(reference)" if g.chunks == 1 and g.done else gap
        acc = ", ".join(f"{100 * c[0]:.1f}%" if c else "-" for c in g.chunk_answer_acc()) or "-"
        lines.append(
            f"| {label(g.key, common)} | {r['seeds']}/{r['runs']} | {per_chunk} | **{_pm(g.last())}** | {gap} | "
            + (f"{acc} | {r['steps_to_95pct_answer_acc'] or '-'} | " if answers else "")
            + ("-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.1f} MB") + " | "
            + ("-" if r["wall_s"] is None else f"{r['wall_s']:.0f} s") + " | "
            + ("-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}") + " |")
    bad = [r for r in records if not r.finished]
    if bad:
        lines += ["", f"Not included ({len(bad)} run{'s' if len(bad) != 1 else ''}):", ""]
        lines += [f"- `{r.dir}`: {r.status}" for r in bad]
    lines += ["", "Gap: the last chunk's mean final val loss minus that of the end-to-end group with the same "
              "other settings (chunks=1). Peak memory: CUDA allocator peak on GPU, else bytes saved for backward "
              "in one step. ± is the standard deviation over seeds."]
    chances = sorted({r.summary["chance"]["answer_acc"] for r in records if r.finished and r.summary.get("chance")})
    if chances:
        lines += ["", "Answer accuracy: the last validation's accuracy on the task's answer tokens only; chance (a "
                  "uniform guess over the tokens an answer can be): " + ", ".join(f"{100 * c:.1f}%" for c in chances)
                  + ". Steps to 95%: the first validation at which the last chunk's answer accuracy, averaged over "
                  "the seeds, reached 95%."]
    kept = depth_benefit.markdown(all_groups, lambda g: label(g.key, common))
    return "\n".join(lines) + "\n" + ("\n" + kept if kept else "")


def write_report(paths, out_dir) -> tuple[list[Group], list[RunRecord]]:
    """Read every run under ``paths``; write compare.md, compare.csv and the figures into ``out_dir``."""
    from locallearn.compare_plots import plot_all

    records = collect(paths)
    all_groups = groups(records)
    out = Path(out_dir)
    write_text(out / "compare.md", markdown(all_groups, records))
    rows = table_rows(all_groups)
    with atomic_open(out / "compare.csv", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["group"])
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else ("" if v is None else v) for k, v in r.items()})
    with atomic_open(out / "runs.csv", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "group", "seed", "status", "last_val_loss", "wall_s"])
        for r in records:
            last = list(r.summary["val_loss"].values())[-1] if r.finished else ""
            w.writerow([r.dir, label(group_key(r.overrides)), r.seed, r.status, last,
                        r.summary.get("wall_time_s", "")])
    plot_all(all_groups, out)
    return all_groups, records
