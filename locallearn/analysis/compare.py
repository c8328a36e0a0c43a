"""Sweep reports: each group of runs (its overrides except the seed) against its end-to-end reference.

:func:`write_report` writes ``compare.md``, ``compare.csv``, ``runs.csv`` and the figures (the runs are read by
:mod:`locallearn.analysis.sweeps`); ``analysis/compare.py`` is the command line. A failed or unfinished run never stops
a report: it is listed with its status.
"""

import csv
import json
import math
from pathlib import Path

from locallearn.analysis import depth_benefit
from locallearn.analysis.compare_plots import plot_all
from locallearn.analysis.sweeps import Group, RunRecord, collect, common_items, end_to_end_for, group_key, groups, label
from locallearn.atomic import atomic_open, write_text


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
        bpc = g.stat(lambda s: list(s["val_bpc"].values())[-1] if s.get("val_bpc") else None)
        rows.append({
            "group": label(g.key), "chunks": g.chunks, "seeds": len(g.done), "runs": len(g.runs),
            "val_loss_per_chunk": [list(c) if c else None for c in g.chunk_losses()],
            "answer_acc_per_chunk": [list(c) if c else None for c in g.chunk_answer_acc()] or None,
            "steps_to_95pct_answer_acc": g.steps_to(0.95),
            "last_mean": last[0] if last else None, "last_std": last[1] if last else None,
            "last_bpc_mean": bpc[0] if bpc else None, "last_bpc_std": bpc[1] if bpc else None,
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
    rows = table_rows(all_groups)
    common = common_items(all_groups)
    answers = any(r["answer_acc_per_chunk"] for r in rows)
    bpc = any(r["last_bpc_mean"] is not None for r in rows)  # text: bits per character compare across tokenizers
    lines = [f"All runs: {label(sorted(common))}.", ""] if common else []
    lines += ["| group | seeds | val loss per chunk (mean ± std) | last chunk | " + ("last chunk, bits per char | "
              if bpc else "") + "gap to end-to-end | " + ("answer accuracy per chunk | steps to 95% | " if answers
                                                           else "")
              + "peak act. memory | wall time | tokens/s |", "| --- " * (8 + 2 * answers + bpc) + "|"]
    for g, r in zip(all_groups, rows):
        per_chunk = ", ".join(_pm(c) for c in g.chunk_losses()) or "-"
        gap = "-" if r["gap"] is None else f"{r['gap']:+.4f} ({r['gap_pct']:+.2f}%)"
        gap = "(reference)" if g.chunks == 1 and g.done else gap
        acc = ", ".join(f"{100 * c[0]:.1f}%" if c else "-" for c in g.chunk_answer_acc()) or "-"
        lines.append(
            f"| {label(g.key, common)} | {r['seeds']}/{r['runs']} | {per_chunk} | **{_pm(g.last())}** | "
            + (f"{_pm((r['last_bpc_mean'], r['last_bpc_std']) if r['last_bpc_mean'] is not None else None)} | "
               if bpc else "") + f"{gap} | "
            + (f"{acc} | {r['steps_to_95pct_answer_acc'] or '-'} | " if answers else "")
            + ("-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.1f} MB") + " | "
            + ("-" if r["wall_s"] is None else f"{r['wall_s']:.0f} s") + " | "
            + ("-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}") + " |")
    bad = [r for r in records if not r.finished]
    if bad:
        lines += ["", f"Not included ({len(bad)} run{'s' if len(bad) != 1 else ''}):", ""]
        lines += [f"- `{r.dir}`: {r.status}" for r in bad]
    lines += ["", "Gap: the last chunk's mean final val loss minus that of the end-to-end group with the same "
              "other settings (chunks=1), in nats per token (compare groups of different tokenizers by bits per "
              "character). Peak memory: CUDA allocator peak on GPU, else bytes saved for backward "
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
