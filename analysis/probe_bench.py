"""How long the probe analysis takes, and what fitting the probes in torch changes.

    python analysis/probe_bench.py --runs <K=4 run> --reference <its end-to-end run>   # UPOS on UD EWT
    python analysis/probe_bench.py --runs <run> --reference <e2e run> --set task=deprel max_train_words=5000

Runs the whole probe analysis (conf/probing.yaml: every layer, the control task, the random-init baseline,
CKA) three times on the same runs, in this process, one after the other:

1. ``probe=linear`` (torch) with an empty feature cache: what a first analysis costs (features extracted);
2. ``probe=linear`` again, the features now cached: the probes, CKA, tables and figures;
3. ``probe=linear_sklearn``, cached: the same probes fitted by scikit-learn, a layer and a C at a time.

Prints a table of wall times and the largest accuracy difference between 2 and 3 (test, dev and control,
over every model and layer), and writes JSON (--out).
"""

import argparse
import csv
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from locallearn.atomic import write_text
from locallearn.config import compose_run_config, quote
from locallearn.errors import ConfigError
from locallearn.probing.report import probe_runs


def analysis(runs: str, reference: str, settings: list[str], probe: str, cache: Path, out: Path) -> tuple[float, list]:
    """Wall seconds of one probe analysis, and its probes.csv rows."""
    overrides = [f"runs={quote(runs)}", f"reference={quote(reference)}", f"probe={probe}",
                 f"cache_dir={quote(str(cache))}", *settings]
    cfg = compose_run_config(out, overrides, config_name="probing")
    start = time.perf_counter()
    probe_runs(cfg, out)
    seconds = time.perf_counter() - start
    with open(out / "probes.csv", newline="") as f:
        return seconds, list(csv.DictReader(f))


def largest_difference(a: list[dict], b: list[dict]) -> float:
    """The largest |accuracy difference| between two analyses' rows (test, dev, control), in points."""
    key = lambda r: (r["label"], r["layer"], r["split"])  # noqa: E731
    other = {key(r): r for r in b}
    diffs = [abs(float(r[c]) - float(other[key(r)][c])) for r in a for c in ("accuracy", "control_accuracy")
             if r[c] not in ("", None) and other[key(r)][c] not in ("", None)]
    return 100 * max(diffs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="a local run (or a multirun) to probe")
    ap.add_argument("--reference", required=True, help="its end-to-end run (CKA's reference)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="probing overrides, e.g. task=deprel")
    ap.add_argument("--out", type=Path, default=Path("probe_bench.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the analyses' progress
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            first, _ = analysis(args.runs, args.reference, args.set, "linear", tmp / "cache", tmp / "first")
            cached, torch_rows = analysis(args.runs, args.reference, args.set, "linear", tmp / "cache", tmp / "torch")
            sk, sk_rows = analysis(args.runs, args.reference, args.set, "linear_sklearn", tmp / "cache", tmp / "sk")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    diff = largest_difference(torch_rows, sk_rows)
    rows = [("probe=linear (torch), features extracted", first), ("probe=linear (torch), features cached", cached),
            ("probe=linear_sklearn (scikit-learn), features cached", sk)]
    print("| probe analysis | wall time |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} s |")
    print(f"\nfeature extraction: {first - cached:.1f} s; probes fitted by torch instead of scikit-learn: "
          f"{sk / cached:.1f}x faster (whole cached analysis); largest accuracy difference: {diff:.2f} points "
          f"({len(torch_rows)} rows)")
    write_text(args.out, json.dumps({"runs": args.runs, "reference": args.reference, "settings": args.set,
                                     "seconds": dict(rows), "largest_difference_points": diff,
                                     "rows": len(torch_rows)}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
