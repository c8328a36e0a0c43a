"""Memory and throughput of local learning, by number of chunks and execution mode.

    python analysis/bench.py                                   # model=small, chunks 1 2 4, every mode, CPU
    python analysis/bench.py --chunks 1 2 4 8 --set model.n_layer=8 --steps 40
    python analysis/bench.py --device cuda --set model=base data.batch_size=32
    python analysis/bench.py --modes joint sequential --compile   # and compile=true (torch.compile of the blocks)
    python analysis/bench.py --modes sequential --methods local interlock synthetic delayed   # methods at K=max
    python analysis/bench.py --setting activations --modes sequential   # model=base, batch 32 x 256: activations
                                                                        #   dominate; 5 steps, one process each

Each configuration trains in a fresh process (locallearn/measure.py) through the real config and
Lightning, with validation and checkpoints off: median step time and tokens/s over --steps steps
after --warmup (the fastest of --repeats processes), peak bytes saved for backward in one step (the
most any one process holds), the CUDA allocator peak, the peak resident memory of the processes,
the auxiliary heads' share of the forward FLOPs. A plain PyTorch loop over the same model (mode
joint, K=1) gives the framework overhead.
Prints a markdown table, the issue's targets, and writes JSON (--out).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from locallearn.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]


REPEATS = 3

# Named settings: their run-config overrides and the timing defaults they need (--steps, --warmup, --repeats).
SETTINGS = {
    "small": {"overrides": ["model=small"], "steps": 30, "warmup": 5, "repeats": 3},
    # where activations dominate a process's memory (~2 GB saved for backward at K=1 against ~0.5 GB of weights,
    # Adam state and libraries); a step takes seconds on a CPU, so few steps and one process per configuration
    "activations": {"overrides": ["model=base", "data.batch_size=32"], "steps": 5, "warmup": 1, "repeats": 1},
}


def measure_in_process(args: dict) -> dict | str:
    """``python -m locallearn.measure <args>`` in a fresh process: its JSON result, or its last error line."""
    proc = subprocess.run([sys.executable, "-m", "locallearn.measure", json.dumps(args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_one(overrides, steps, warmup, bare=False, threads=None, kind=None) -> dict:
    """The configuration in ``REPEATS`` fresh processes; the one with the lowest median step time (timings of
    identical processes differ by up to 10% on a shared machine; the fastest is the least disturbed).
    ``kind="profile"``: one process, where its step time goes (locallearn.measure.profile_ops)."""
    kind = kind or ("bare" if bare else "lightning")
    args = {"overrides": overrides, "steps": steps, "warmup": warmup, "kind": kind, "threads": threads}
    runs = []
    for _ in range(1 if kind in ("profile", "blocks") else REPEATS):
        result = measure_in_process(args)
        if isinstance(result, str):
            setting = dict(o.split("=", 1) for o in overrides)
            return {"overrides": overrides, "error": result, "chunks": int(setting.get("chunks", 0)),
                    "mode": ("bare " if bare else "") + setting.get("mode", "?")}
        runs.append(result)
    if kind in ("profile", "blocks"):
        return runs[0]
    best = min(runs, key=lambda r: r["step_ms"])
    best["step_ms_repeats"] = [r["step_ms"] for r in runs]
    return best


def process_peak(row: dict) -> int:
    """A configuration's peak process memory: the CUDA allocator's peak on a GPU, else the peak resident memory
    (both the most of any one process)."""
    return row["cuda_peak_allocated_bytes"] or row["peak_rss_bytes"]


def _fmt_bytes(b):
    return "-" if b is None else f"{b / 2**20:,.1f} MB"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", default=["joint", "sequential", "pipeline"])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="small",
                    help="small: model=small, batch 16 x 128 (default); activations: model=base, batch 32 x 256")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="run-config overrides for every configuration, after the setting's (data=synthetic unless "
                         "a data= is given)")
    ap.add_argument("--steps", type=int, help="timed steps per configuration (default: the setting's, 30 or 5)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default: the setting's, 5 or 1)")
    ap.add_argument("--repeats", type=int, help="fresh processes per configuration; the fastest counts (default: the "
                                                "setting's, 3 or 1)")
    ap.add_argument("--compile", action="store_true",
                    help="also time compile=true (torch.compile of every block) for each mode at the largest K and K=1")
    ap.add_argument("--methods", nargs="*", default=[], metavar="METHOD",
                    help="also time each method (conf/method/) in sequential mode at the largest K, and step them in "
                         "turn with K=1 in one process")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=Path, default=Path("bench.json"))
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    setting = SETTINGS[args.setting]
    for key in ("steps", "warmup", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, setting[key])
    if args.steps < 3 or args.warmup < 1 or args.repeats < 1:
        print(f"error: --steps={args.steps}, --warmup={args.warmup} and --repeats={args.repeats} must be at least 3, "
              f"1 and 1.", file=sys.stderr)
        return 2
    global REPEATS
    REPEATS = args.repeats
    data = [] if any(o.startswith("data=") for o in args.set) else \
        ["data=synthetic", "data.n_train_tokens=200000", "data.n_val_tokens=20000"]
    base = [*setting["overrides"], *data, f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
            "schedule.warmup_steps=1", *args.set]
    # the bare loop's reference: one chunk in mode=joint, where a sliced loss does not apply (and is refused)
    bare = [o for o in base if not o.startswith("loss_slices=")]
    rows = [run_one([*bare, "chunks=1", "mode=joint"], args.steps, args.warmup, bare=True)]
    for mode in args.modes:
        for k in args.chunks:
            if mode == "pipeline" and k == 1:
                continue  # one chunk has nothing to pipeline: it is sequential
            rows.append(run_one([*base, f"chunks={k}", f"mode={mode}"], args.steps, args.warmup))
            print(f"  {mode} chunks={k}: " + (f"{rows[-1]['step_ms']:.1f} ms/step" if "error" not in rows[-1]
                                               else rows[-1]["error"]), file=sys.stderr)
    K = max(args.chunks)
    for method in args.methods:
        row = run_one([*base, f"chunks={K}", "mode=sequential", f"method={method}"], args.steps, args.warmup)
        row["mode"] = f"sequential, method={method}"
        rows.append(row)
        print(f"  {row['mode']} chunks={K}: " + (f"{row['step_ms']:.1f} ms/step" if "error" not in row
                                                 else row["error"]), file=sys.stderr)
    if "pipeline" in args.modes and 2 in args.chunks and args.device == "cpu":
        # the bound for a 2-process pipeline: each process gets one core, so at best it runs the
        # sequential step at one thread twice as often
        one = run_one([*base, "chunks=2", "mode=sequential"], args.steps, args.warmup, threads=1)
        if "error" not in one:
            one["mode"] = "sequential, 1 thread"
            rows.append(one)
    interleaved = None
    if "sequential" in args.modes and max(args.chunks) > 1:
        # the step-time ratio K=max / K=1, both built in one process and stepped in turn
        configs = [[*base, f"chunks={k}", "mode=sequential"] for k in (1, K)]
        configs += [[*base, f"chunks={K}", "mode=sequential", f"method={m}"] for m in args.methods]
        interleaved = measure_in_process({"configs": configs, "steps": args.steps, "warmup": args.warmup,
                                          "kind": "interleaved"})
    profiles = []
    if "sequential" in args.modes or args.compile:
        # where a step's time goes, eager: what compile can reach, and what the extra chunks cost
        mode = "sequential" if "sequential" in args.modes else args.modes[0]
        for k in sorted({1, max(args.chunks)}):
            profiles.append(run_one([*base, f"chunks={k}", f"mode={mode}"], args.steps, args.warmup, kind="profile"))
    blocks = None
    if args.compile:
        blocks = run_one([*base, "chunks=1"], args.steps, args.warmup, kind="blocks")
        for mode in [m for m in args.modes if m != "pipeline"]:
            for k in sorted({1, max(args.chunks)}):
                row = run_one([*base, f"chunks={k}", f"mode={mode}", "compile=true"], args.steps, args.warmup)
                row["mode"] = f"{mode}, compiled"
                rows.append(row)
    ok = [r for r in rows if "error" not in r]
    ref = {r["mode"]: r for r in ok if r["chunks"] == 1}
    ref["pipeline"] = ref.get("sequential")
    ref |= {f"sequential, method={m}": ref.get("sequential") for m in args.methods}
    ref["sequential, 1 thread"] = None
    print(f"| mode | chunks | step: fastest (slowest) of {REPEATS} | tokens/s | step vs K=1 | act. memory (max per "
          f"process) | vs K=1 | held between steps | peak RSS (max per process) | CUDA peak | process peak vs K=1 | "
          f"aux heads' FLOPs |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['chunks']} | error: {r['error']} | | | | | | | | | |")
            continue
        k1 = ref.get(r["mode"])
        t_ratio = f"{r['step_ms'] / k1['step_ms']:.2f}x" if k1 else "-"
        m_ratio = f"{r['activation_bytes'] / k1['activation_bytes']:.3f}" if k1 and k1["activation_bytes"] else "-"
        slowest = max(r.get("step_ms_repeats") or [r["step_ms"]])
        print(f"| {r['mode']} | {r['chunks']} | {r['step_ms']:.1f} ({slowest:.1f}) ms | {r['tokens_per_s']:,.0f} | "
              f"{t_ratio} | "
              f"{_fmt_bytes(r['activation_bytes'])} | {m_ratio} | {_fmt_bytes(r.get('method_state_bytes'))} | "
              f"{_fmt_bytes(r['peak_rss_bytes'])} | "
              f"{_fmt_bytes(r['cuda_peak_allocated_bytes'])} | "
              f"{f'{process_peak(r) / process_peak(k1):.3f}' if k1 else '-'} | {r['aux_head_flop_share']:.1%} |")

    good = [p for p in profiles if "error" not in p]
    if good:
        print("\n| where a bare-loop step's CPU time goes (torch.profiler) | chunks | GEMMs | attention | "
              "everything else | total | compile's ceiling (1 / library share) |\n|---|---|---|---|---|---|---|")
        for p in good:
            ms = p["ms_per_step"]
            print(f"| {p['mode']} | {p['chunks']} | {ms['matmul']:.1f} ms | {ms['attention']:.1f} ms | "
                  f"{ms['other']:.1f} ms | {p['total_ms']:.1f} ms | {1 / p['library_share']:.2f}x |")

    def get(mode, k):
        return next((r for r in ok if r["mode"] == mode and r["chunks"] == k), None)

    checks = []
    s1, s4, s2, p2 = get("sequential", 1), get("sequential", 4), get("sequential", 2), get("pipeline", 2)
    bare, j1 = get("bare joint", 1), get("joint", 1)
    if s1 and s4:
        checks.append(("sequential K=4 activation memory saved vs K=1", 1 - s4["activation_bytes"] /
                       s1["activation_bytes"], ">= 0.60", 1 - s4["activation_bytes"] / s1["activation_bytes"] >= 0.6))
        saved = s4["activation_bytes"] / s1["activation_bytes"]
        checks.append(("sequential K=4 / K=1 bytes saved for backward (1/K plus the heads)", saved, "<= 0.26",
                       saved <= 0.26))
        peak = process_peak(s4) / process_peak(s1)
        kind = "CUDA allocator" if s1["cuda_peak_allocated_bytes"] else "RSS"
        checks.append((f"sequential K=4 / K=1 peak process memory ({kind})", peak, "<= 0.5", peak <= 0.5))
        checks.append(("sequential step time K=4 / K=1", s4["step_ms"] / s1["step_ms"], "<= 1.05",
                       s4["step_ms"] / s1["step_ms"] <= 1.05))
    if isinstance(interleaved, dict):
        ratio = interleaved["ratio_to_first"][1]
        checks.append((f"  the same, K={K} / K=1 stepped in turn in one process (bare loop)", ratio,
                       "<= 1.05", ratio <= 1.05))
        for method, ratio in zip(args.methods, interleaved["ratio_to_first"][2:]):
            checks.append((f"  method={method} K={K} / K=1 stepped in turn in one process (bare loop)", ratio, "-",
                           True))
    if s2 and p2:
        checks.append(("pipeline K=2 / sequential K=2 tokens/s", p2["tokens_per_s"] / s2["tokens_per_s"], ">= 1.6",
                       p2["tokens_per_s"] / s2["tokens_per_s"] >= 1.6))
        one = get("sequential, 1 thread", 2)
        if one:
            bound = 2 * one["tokens_per_s"] / s2["tokens_per_s"]
            checks.append(("  bound: 2 x sequential K=2 at 1 thread / sequential K=2", bound, "(>= 1.6 to be possible)",
                           bound >= 1.6))
            checks.append(("  pipeline K=2 / that bound", p2["tokens_per_s"] / (2 * one["tokens_per_s"]), "-", True))
    if bare and j1:
        checks.append(("Lightning K=1 / bare PyTorch step time", j1["step_ms"] / bare["step_ms"], "<= 1.05",
                       j1["step_ms"] / bare["step_ms"] <= 1.05))
    if blocks and "error" not in blocks:
        checks.append(("  bound: the blocks alone, compiled / eager forward+backward time", blocks["speedup"],
                       "(>= 1.3 to be possible)", blocks["speedup"] >= 1.3))
    for mode in args.modes:
        for k in sorted({1, max(args.chunks)}):
            eager, compiled = get(mode, k), get(f"{mode}, compiled", k)
            if eager and compiled:
                ratio = compiled["tokens_per_s"] / eager["tokens_per_s"]
                checks.append((f"compile=true / eager tokens/s, {mode} K={k}", ratio, ">= 1.3", ratio >= 1.3))
    if checks:
        print("\n| target | measured | wanted | met |\n|---|---|---|---|")
        for name, value, wanted, met in checks:
            print(f"| {name} | {value:.3f} | {wanted} | {'yes' if met else 'no'} |")
    settings = {"overrides": base, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                "compile": args.compile, "device": args.device, "cpu_count": os.cpu_count()}
    targets = [dict(zip(("target", "measured", "wanted", "met"), c)) for c in checks]
    write_text(args.out, json.dumps({"settings": settings, "rows": rows, "profiles": profiles, "blocks": blocks,
                                     "interleaved": interleaved, "targets": targets},
                                    indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
