"""The trade-off a researcher picks from: the share of the depth benefit each way of training keeps, against the
activation memory a training step of it holds, relative to end to end.

    python analysis/tradeoff.py logs/multiruns/<sweep> [more sweeps ...] [--out <dir>]

Reads the sweeps as analysis/compare.py does (``kept``: locallearn/analysis/depth_benefit.py, per seed, mean and
95% t-interval). Memory is measured, not read from the runs (which may have run in mode=joint, where every chunk's
graph is alive at once): each group's run config is stepped twice in mode=sequential on the CPU
(locallearn.measure.step_memory: the peak bytes saved for backward, plus what a method keeps between steps),
deterministically, in seconds. Writes tradeoff.md, tradeoff.json and kept_vs_memory.png (default: into
<first sweep>/compare).
"""

import argparse
import json
import sys
from pathlib import Path

from locallearn.analysis import depth_benefit
from locallearn.analysis.compare_plots import kept_vs_memory
from locallearn.analysis.sweeps import collect, common_items, groups, label, report_dir
from locallearn.atomic import write_text
from locallearn.config import load_saved
from locallearn.measure import step_memory


def memory_of(group) -> dict[str, int]:
    run = group.done[0]
    return step_memory(load_saved(run.dir / "config.yaml", resolve=True), int(run.summary["vocab_size"]))


def _kept(k) -> dict | None:
    if k is None or not k.clear:
        return None
    ci = k.interval()
    return {"kept": 100 * k.mean, "low": 100 * ci[0] if ci else None, "high": 100 * ci[1] if ci else None,
            "seeds": len(k.values)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="multirun or run directories")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: <first sweep>/compare)")
    args = ap.parse_args(argv)
    all_groups = groups(collect(args.dirs))
    rows = depth_benefit.rows(all_groups)
    if not rows:
        print("error: no local group with both end-to-end references (the full depth and the depth of one chunk) in "
              f"{', '.join(map(str, args.dirs))}; sweep them together (experiment=depth_benefit/...).", file=sys.stderr)
        return 2
    common = common_items(all_groups)
    e2e = rows[0].e2e
    reference = memory_of(e2e)
    base = reference["saved_peak"]
    points = []
    for g, ref in [(e2e, 100.0), (rows[0].shallow, 0.0)]:
        m = memory_of(g)
        points.append({"name": f"{label(g.key, common)} (reference)", "reference": True,
                       "memory": (m["saved_peak"] + m["held"]) / base, **m,
                       **{metric: {"kept": ref, "low": None, "high": None} for metric in rows[0].results}})
    for r in rows:
        m = memory_of(r.local)
        points.append({"name": label(r.local.key, common), "chunks": r.local.chunks, **m,
                       "memory": (m["saved_peak"] + m["held"]) / base,
                       **{metric: _kept(k) for metric, k in r.results.items()}})
    out = args.out or report_dir(args.dirs[0], "compare")
    figure = kept_vs_memory(points, out / "kept_vs_memory.png")
    metrics = [m for m in ("loss", "answer_acc") if any(p.get(m) for p in points)]
    lines = ["| way of training | K | " + " | ".join(f"kept ({m})" for m in metrics)
             + " | saved for backward | held between steps | memory vs end to end |",
             "|---|---|" + "---|" * len(metrics) + "---|---|---|"]
    for p in points:
        cells = []
        for m in metrics:
            k = p.get(m)
            cells.append("-" if not k else f"{k['kept']:.0f}%" + (f" [{k['low']:.0f}, {k['high']:.0f}]"
                                                                   if k.get("low") is not None else ""))
        lines.append(f"| {p['name']} | {p.get('chunks', '-')} | " + " | ".join(cells)
                     + f" | {p['saved_peak'] / 2**20:.2f} MB | {p['held'] / 2**20:.2f} MB | {p['memory']:.3f} |")
    lines += ["", "kept: mean over seeds [95% t-interval] (locallearn/analysis/depth_benefit.py); '-': depth buys "
              "nothing measurable there, or the metric is absent. Memory: one mode=sequential step of the group's "
              "run config (locallearn.measure.step_memory), the peak bytes saved for backward plus what the method "
              "keeps between steps, over the end-to-end model's peak."]
    text = "\n".join(lines) + "\n"
    write_text(out / "tradeoff.md", text)
    write_text(out / "tradeoff.json", json.dumps(points, indent=2))
    print(text)
    print(f"wrote {out / 'tradeoff.md'}, {out / 'tradeoff.json'} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
