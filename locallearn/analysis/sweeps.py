"""Sweep directories, read back: every run's overrides, summary and curves, grouped over seeds.

:func:`collect` reads run and multirun directories (``summary.json``, ``.hydra/overrides.yaml`` and the
TensorBoard validation curve of each run), :func:`groups` aggregates over seeds, :func:`end_to_end_for`
finds a group's end-to-end reference. The reports (:mod:`.compare`, :mod:`.depth_benefit`,
:mod:`.curve_fit`) and the probing read runs through it.
"""

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev

import yaml

from locallearn.config import under, upgrade_override
from locallearn.errors import ConfigError

# Overrides that do not change what a run computes (or are the seed itself): not part of a group's identity.
IGNORED = ("seed", "trainer.enable_progress_bar", "ckpt_path", "paths", "hydra", "logger")
# Overrides that say how a model is cut into chunks: the matching end-to-end group differs in these only.
LOCAL_KEYS = ("chunks", "boundaries", "overlap", "interlock", "method", "head", "loss_weights", "switch", "mode",
              "variant")


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
            key, _, value = upgrade_override(item).lstrip("+~").partition("=")
            if key and not under(key, IGNORED):
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
    """Tag -> (step, value) of scalars in the run's TensorBoard events, or in its ``csv/metrics.csv`` where it
    logged with ``logger=csv`` only (empty for a tag the run never logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {tag: {} for tag in tags}
    events = sorted((run_dir / "tb").rglob("events.out.tfevents.*"))
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in set(tags) & set(acc.Tags().get("scalars", [])):
            points[tag].update({e.step: e.value for e in acc.Scalars(tag)})  # a resumed run: later files win
    table = run_dir / "csv" / "metrics.csv"
    if not events and table.is_file():  # a run logged with logger=csv only
        with table.open(newline="") as f:
            for row in csv.DictReader(f):
                for tag in tags:
                    if row.get(tag) not in (None, ""):
                        points[tag][int(row["step"])] = float(row[tag])
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
    for g in all_groups:
        if g is not group and g.chunks == 1 and g.done and blocks(g) == depth and _same_settings(group, g):
            return g
    return None


def _settings(group: Group) -> dict[str, str]:
    """A group's overrides less the chunk settings and the depth (an end-to-end reference differs in those)."""
    return {k: v for k, v in group.key if not under(k, LOCAL_KEYS) and k != "model.n_layer"}


def _same_settings(a: Group, b: Group) -> bool:
    """Whether two groups differ in chunk settings and depth only. An override one group has and the other lacks
    counts as the same when it restates the other's value (``trainer.max_steps=4000`` given to a sweep of a recipe
    that trains 4,000 steps anyway); that value is read from the other group's saved run config."""
    sa, sb = _settings(a), _settings(b)
    for key in set(sa) | set(sb):
        va = sa[key] if key in sa else _config_value(a, key)
        vb = sb[key] if key in sb else _config_value(b, key)
        if not _equal(va, vb):
            return False
    return True


def _config_value(group: Group, key: str):
    """``key`` in the saved config.yaml of the group's first finished run (None without one)."""
    path = group.done[0].dir / "config.yaml" if group.done else None
    if path is None or not path.is_file():
        return None
    node = yaml.safe_load(path.read_text())
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)
