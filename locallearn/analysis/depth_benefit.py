"""The headline measure of a sweep: the share of the depth benefit a local run keeps.

For a local run of L blocks in K chunks, with ``E`` the end-to-end model of the same L blocks and ``S``
the end-to-end model with the depth of one chunk (L/K blocks; same data, steps and seed)::

    kept = (S - local) / (S - E)            on the final val loss of the last chunk
    kept = (local - S) / (E - S)            on its answer accuracy (tasks)

100% = local matches end to end, 0% = the depth bought nothing, < 0 = worse than the shallow model.
It is computed per seed (the seeds all three groups share) and reported as the mean with a 95% Student-t
interval over those seeds. When depth buys nothing measurable (the benefit ``S - E`` is not above zero
with 95% confidence over the seeds, or not positive with one seed) the ratio means nothing and is not
reported: the table says so instead.
"""

import math
from dataclasses import dataclass
from statistics import mean, stdev

from scipy import stats

from locallearn.analysis.sweeps import Group, blocks, end_to_end_for

METRICS = {  # name -> (value of a run's summary, sign: +1 if larger is better)
    "loss": (lambda s: list(s["val_loss"].values())[-1] if s.get("val_loss") else None, -1),
    "answer_acc": (lambda s: list(s["answer_acc"].values())[-1] if s.get("answer_acc") else None, +1),
}


def chunk_depth(group: Group) -> int | None:
    """Blocks of its deepest chunk (its own blocks; an overlap adds none): the depth of the shallow baseline."""
    layers = group.done[0].summary.get("layers") if group.done else None
    return max(len(c) for c in layers) if layers else None


@dataclass
class Kept:
    metric: str
    seeds: list  # the seeds the three groups share
    values: list[float]  # kept per seed (fractions)
    benefit: list[float]  # S - E per seed, in the metric's better direction
    clear: bool  # whether depth buys something measurable

    @property
    def mean(self) -> float:
        return mean(self.values)

    def interval(self) -> tuple[float, float] | None:
        """95% Student-t interval of the mean over seeds (None with one seed)."""
        return _t_interval(self.values)


def _t_interval(values: list[float]) -> tuple[float, float] | None:
    n = len(values)
    if n < 2:
        return None
    half = stats.t.ppf(0.975, n - 1) * stdev(values) / math.sqrt(n)
    return mean(values) - half, mean(values) + half


def kept(local: Group, e2e: Group, shallow: Group, metric: str) -> Kept | None:
    """``kept`` of ``local`` on ``metric`` per shared seed, or None if a group lacks the metric or seeds."""
    value, sign = METRICS[metric]
    by_seed = [{r.seed: value(r.summary) for r in g.done} for g in (local, e2e, shallow)]
    seeds = sorted(set.intersection(*(set(k for k, v in d.items() if v is not None) for d in by_seed)), key=str)
    if not seeds:
        return None
    x, e, s = ([d[seed] for seed in seeds] for d in by_seed)
    benefit = [sign * (ei - si) for ei, si in zip(e, s)]
    low = _t_interval(benefit)
    clear = (low[0] > 0) if low else benefit[0] > 0
    values = [sign * (xi - si) / b if b else math.nan for xi, si, b in zip(x, s, benefit)]
    return Kept(metric, seeds, values, benefit, clear)


@dataclass
class Row:
    local: Group
    e2e: Group
    shallow: Group
    results: dict[str, Kept]  # metric -> kept


def rows(all_groups: list[Group]) -> list[Row]:
    """Every local group whose two end-to-end references (L blocks and L/K blocks) are in the sweep."""
    out = []
    for g in all_groups:
        if g.chunks < 2 or not g.done:
            continue
        e2e, shallow = end_to_end_for(g, all_groups), end_to_end_for(g, all_groups, chunk_depth(g))
        if e2e is None or shallow is None or e2e is shallow:
            continue
        results = {m: k for m in METRICS if (k := kept(g, e2e, shallow, m)) is not None}
        out.append(Row(g, e2e, shallow, results))
    return out


def _pct(k: Kept | None) -> str:
    if k is None:
        return "-"
    if not k.clear:
        return f"n/a: depth buys nothing measurable (benefit {mean(k.benefit):+.3g})"
    ci = k.interval()
    return f"{100 * k.mean:.0f}%" + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else " (1 seed)")


def _ref(g: Group, metric: str) -> str:
    value, _ = METRICS[metric]
    v = [x for x in (value(r.summary) for r in g.done) if x is not None]
    if not v:
        return "-"
    return f"{mean(v):.4f}" if metric == "loss" else f"{100 * mean(v):.1f}%"


def markdown(all_groups: list[Group], name) -> str:
    """The "share of the depth benefit kept" table, or "" when the sweep lacks the end-to-end references."""
    found = rows(all_groups)
    if not found:
        return ""
    has_acc = any("answer_acc" in r.results for r in found)
    head = "| group | K | blocks (chunk) | loss: shallow / e2e / local | kept (loss) |"
    sep = "| --- | --- | --- | --- | --- |"
    if has_acc:
        head += " answer acc: shallow / e2e / local | kept (answer acc) |"
        sep += " --- | --- |"
    lines = ["## Share of the depth benefit kept", "", head, sep]
    for r in found:
        line = (f"| {name(r.local)} | {r.local.chunks} | {blocks(r.local)} ({chunk_depth(r.local)}) | "
                f"{_ref(r.shallow, 'loss')} / {_ref(r.e2e, 'loss')} / {_ref(r.local, 'loss')} | "
                f"{_pct(r.results.get('loss'))} |")
        if has_acc:
            line += (f" {_ref(r.shallow, 'answer_acc')} / {_ref(r.e2e, 'answer_acc')} / "
                     f"{_ref(r.local, 'answer_acc')} | {_pct(r.results.get('answer_acc'))} |")
        lines.append(line)
    lines += ["", "kept = (S - local) / (S - E) on the last chunk's final val loss (on answer accuracy: "
              "(local - S) / (E - S)), where E is the end-to-end model of the same blocks and S the end-to-end "
              "model with the depth of one chunk; per seed, mean and 95% t-interval over the seeds. 100%: local "
              "matches end to end; 0%: the depth bought nothing; < 0: worse than the shallow model.", ""]
    return "\n".join(lines)
