"""Test loss and bits per character of trained runs, per chunk, from best.ckpt (or last.ckpt).

    python analysis/evaluate.py <run or multirun dir> [more ...] [data.test_path=FILE ...] [--ckpt last]
                                [--split val] [--out DIR]

Each run is read with its own data config, its saved tokenizer and any data.* overrides given; every token of the
split after the first is scored once (locallearn/analysis/evaluate.py says how). Prints a markdown table and writes
evaluation.md and evaluation.json (one record per run) into --out (default: <multirun dir>/evaluation, or
<run dir>_evaluation beside a single run: a run directory changes only through its run).
"""

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from locallearn.analysis.sweeps import report_dir
from locallearn.atomic import write_json, write_text
from locallearn.errors import ConfigError
from locallearn.evaluate import evaluate
from locallearn.probing.features import load_run
from locallearn.probing.runs import find_runs, variant_of


def table(records: list[dict]) -> str:
    lines = ["| run | variant | seed | checkpoint (step) | tokenizer | tokens scored | chunk | test loss "
             "(nats/token) | bits per character |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        for k, loss in enumerate(r["loss"]):
            bpc = f"{r['bpc'][k]:.4f}" if r["bpc"] else "—"
            lines.append(f"| {Path(r['run']).name} | {r['variant']} | {r['seed']} | {r['checkpoint']} ({r['step']}) "
                         f"| {r['tokenizer']} | {r['tokens']:,} | {k + 1} | {loss:.4f} | {bpc} |")
    first = records[0]
    unknown = sorted({r["unknown"] for r in records})
    chars = sorted({r["characters"] for r in records})
    span = f"{chars[0]:,}" + (f" to {chars[-1]:,}" if len(chars) > 1 else "")
    lines.append(f"\nsplit: {first['split']} ({first['source']}); every token after the first scored, {span} "
                 f"characters" + (f"; {', '.join(map(str, unknown))} characters or pieces outside a run's "
                                              f"tokenizer, read by its rule" if unknown != [0] else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("items", nargs="+", help="run or multirun directories, then data.* overrides (key=value)")
    ap.add_argument("--split", default="test", help="test (data.test_path, EWT's test file) or val")
    ap.add_argument("--ckpt", default="best", help="best (the lowest val loss) or last")
    ap.add_argument("--out", type=Path, default=None, help="output directory")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    # Run directories carry "=" in their names: an item is a directory when it is one.
    dirs = [Path(i) for i in args.items if Path(i).is_dir()]
    overrides = [i for i in args.items if not Path(i).is_dir()]
    try:
        if not dirs:
            raise ConfigError("no run directory given; pass a run or multirun directory before the overrides.")
        runs = [r for d in dirs for r in find_runs(d)]
        records = []
        for run_dir in runs:
            run = load_run(run_dir, device=args.device, ckpt=args.ckpt)
            ev, cfg = evaluate(run, args.split, overrides), run.cfg
            records.append({**asdict(ev), "variant": variant_of(cfg), "seed": int(cfg.seed),
                            "chunks": int(cfg.chunks), "overrides": overrides})
            print(f"evaluated {run_dir.name}: " + ", ".join(f"chunk{k + 1} {v:.4f}" for k, v in enumerate(ev.loss)),
                  file=sys.stderr)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or report_dir(dirs[0], "evaluation")
    text = table(records)
    write_text(out / "evaluation.md", text)
    write_json(out / "evaluation.json", records, indent=1)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
