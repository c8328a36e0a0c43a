"""Wall time of one local sweep run three ways: jobs one after another (the basic launcher), in parallel with
threads split between them (hydra/launcher=joblib, process.threads=null), and in parallel with every job taking
every core (process.threads=<cores>: what torch does by default).

    python analysis/sweep_timing.py                          # chunks=1,2,4 x seed=0,1 of model=small, 300 steps
    python analysis/sweep_timing.py --jobs 2 --set trainer.max_steps=100
    python analysis/sweep_timing.py --limit 2     # stop a sweep at 2x the first one's wall time (default 3x)

Each sweep runs through run.py in a fresh process; prints a table and writes JSON (--out).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from locallearn.atomic import write_text
from locallearn.process import available_cores

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["chunks=1,2,4", "seed=0,1", "model=small", "data=synthetic", "data.n_train_tokens=200000",
         "data.n_val_tokens=20000", "trainer.max_steps=300", "trainer.val_check_interval=300",
         "trainer.enable_progress_bar=false"]


def run_sweep(args: list[str], limit: float | None) -> dict:
    """One sweep in a fresh process group, stopped (with every job process it started) after ``limit`` seconds."""
    with tempfile.TemporaryDirectory() as logs:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "run.py", "-m", *args, f"paths.log_dir={logs}"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=limit)
            error = None if proc.returncode == 0 else (err.strip().splitlines() or ["?"])[-1]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's workers too (joblib's outlive their parent)
            proc.communicate()
            error = f"stopped after {limit:.0f} s"
        wall = time.perf_counter() - start
        summaries = [json.loads(p.read_text()) for p in Path(logs).glob("multiruns/*/*/summary.json")]
    finished = sum(s.get("status") == "finished" for s in summaries)
    return {"args": args, "wall_s": wall, "jobs": len(summaries), "finished": finished, "rc": proc.returncode,
            "error": error}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=available_cores(), help="jobs at once (default: the cores)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides after the sweep's")
    ap.add_argument("--limit", type=float, default=3.0, help="stop a sweep after this many times the first one's "
                    "wall time (an oversubscribed sweep can take 10x or more)")
    ap.add_argument("--out", type=Path, default=Path("sweep_timing.json"))
    args = ap.parse_args(argv)
    cores = available_cores()
    sweep = [*SWEEP, *args.set]
    parallel = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"]
    ways = {"one after another (basic launcher)": sweep,
            f"{args.jobs} at once, threads split (process.threads=null)": [*sweep, *parallel],
            f"{args.jobs} at once, every job {cores} threads (process.threads={cores})":
                [*sweep, *parallel, f"process.threads={cores}"]}
    rows = []
    for name, overrides in ways.items():
        limit = None if not rows else max(30.0, args.limit * rows[0]["wall_s"])
        rows.append({"way": name, **run_sweep(overrides, limit)})
        print(f"  {name}: {rows[-1]['wall_s']:.0f} s", file=sys.stderr)
    base = rows[0]["wall_s"]
    print(f"| {cores} cores, sweep {' '.join(SWEEP[:2])} | jobs finished | wall time | vs one after another |\n"
          f"|---|---|---|---|")
    for r in rows:
        done = f"{r['finished']}/{r['jobs']}" + (f" (error: {r['error']})" if r["error"] else "")
        more = ">" if r["error"] and r["error"].startswith("stopped") else ""
        print(f"| {r['way']} | {done} | {more}{r['wall_s']:.0f} s | {more}{r['wall_s'] / base:.2f}x |")
    write_text(args.out, json.dumps({"cores": cores, "sweep": sweep, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if all(r["rc"] == 0 or (r["error"] or "").startswith("stopped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
