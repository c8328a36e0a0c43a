"""Power-law fits L(t) = a t^-b + c of every chunk's val curve, for finished runs and multiruns.

    python analysis/fit_curves.py logs/multiruns/<sweep dir>                 # every run; chunks=1 runs as references
    python analysis/fit_curves.py <local run> --reference <end-to-end run> --tolerance 0.01 --target-step 20000

For each run and chunk: a, b, c (the asymptote) with bootstrap standard errors and the predicted
loss at the target step (default 10 x the run's last step). For each local run with an end-to-end
reference (given, or the chunks=1 run of the same sweep with the same other overrides and seed):
the step from which the local run's last chunk is predicted to stay more than the tolerance behind
end-to-end up to the target step, i.e. when it should switch to global training (switch.at). Writes fits.csv,
switch.csv, fits.md and one fit_<run>.png per run into --out (default <multirun dir>/fits, or <run dir>_fits
beside a single run).

A fit whose chunk's logged LR (train/lr/chunk{k}) was not constant under the fitted points (the default
cosine schedule), or that the data do not identify, is not extrapolated: no prediction, no switch step,
no curve past the data, and the reason instead (locallearn.analysis.curve_fit.PowerLaw.not_extrapolated).
"""

import argparse
import csv
import math
import sys
from pathlib import Path

from locallearn.analysis import loss_plots
from locallearn.analysis.curve_fit import fit_runs, gap_crossing, reference_for
from locallearn.analysis.sweeps import report_dir
from locallearn.atomic import atomic_open, write_text
from locallearn.errors import ConfigError


def _name(run_fits) -> str:
    return run_fits.run.dir.name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories")
    ap.add_argument("--reference", type=Path, default=None, help="an end-to-end run to compare local runs with")
    ap.add_argument("--tolerance", type=float, default=0.01, help="gap in nats that calls for global training")
    ap.add_argument("--target-step", type=int, default=None, help="step to predict (default: 10 x the last step)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: <multirun dir>/fits, "
                    "or <run dir>_fits beside a single run)")
    args = ap.parse_args(argv)
    if args.tolerance <= 0:
        print(f"error: --tolerance={args.tolerance} must be a positive gap in nats.", file=sys.stderr)
        return 2
    try:
        runs = fit_runs(args.dirs, args.target_step)
        refs = fit_runs([args.reference], args.target_step) if args.reference else []
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if refs and len(refs[0].curves) != 1:
        print(f"error: --reference {args.reference} has {len(refs[0].curves)} chunks; pass an end-to-end "
              f"(chunks=1) run.", file=sys.stderr)
        return 2
    out = args.out or report_dir(args.dirs[0], "fits")

    md = ["| run | chunk | points | target step | a | b | c (asymptote) | predicted loss at the target step | rmse |",
          "|---|---|---|---|---|---|---|---|---|"]
    fit_rows, switch_rows = [], []
    for r in runs:
        if not r.curves:
            md.append(f"| {_name(r)} | - | 0 | no val curve in tb/ ({r.run.status}) | | | | | |")
            continue
        for k, fit in sorted(r.fits.items()):
            row = {"run": str(r.run.dir), "chunk": k, "points": len(r.curves[k][0]), "target_step": r.predict_at}
            if isinstance(fit, str):
                md.append(f"| {_name(r)} | {k} | {row['points']} | {r.predict_at} | not fitted: {fit} | | | | |")
                fit_rows.append(row | {"error": fit})
                continue
            mean, std, lo, hi = ("",) * 4 if fit.not_extrapolated else fit.predict(r.predict_at)
            fit_rows.append(row | {"a": fit.a, "b": fit.b, "c": fit.c, "a_std": fit.a_std, "b_std": fit.b_std,
                                   "c_std": fit.c_std, "predicted": mean, "predicted_std": std, "p16": lo,
                                   "p84": hi, "rmse": fit.rmse, "identified": fit.identified,
                                   "not_extrapolated": fit.not_extrapolated, "error": ""})
            md.append(f"| {_name(r)} | {k} | {fit.n} | {r.predict_at} | {fit.markdown_cells(r.predict_at)}")
        loss_plots.curve_fits(r.curves, {k: f for k, f in r.fits.items() if not isinstance(f, str)},
                              out / f"fit_{_name(r)}.png", r.predict_at, title=_name(r)[:80])

        ref = refs[0] if refs else reference_for(r, runs)
        if len(r.curves) < 2 or ref is None:
            continue
        local, e2e = r.fits[max(r.fits)], ref.fits[1]
        if isinstance(local, str) or isinstance(e2e, str):
            continue
        pair = {"run": str(r.run.dir), "reference": str(ref.run.dir)}
        why = [f"{name}'s fit is not extrapolated: {f.not_extrapolated}"
               for name, f in (("the last chunk", local), ("the reference", e2e)) if f.not_extrapolated]
        if why:  # a switch step is a prediction too: say why there is none
            switch_rows.append(pair | {"step": "", "not_extrapolated": "; ".join(why)})
            continue
        cross = gap_crossing(local, e2e, args.tolerance, r.curves[max(r.curves)][0][0], r.predict_at)
        switch_rows.append(pair | cross | {"not_extrapolated": ""})

    lines = ["Fits of L(t) = a t^-b + c to each chunk's val curve (± bootstrap standard error).", "", *md]
    if switch_rows:
        lines += ["", f"When to switch to global training: the step from which the last chunk is predicted to stay "
                  f"more than {args.tolerance} nats behind end-to-end up to the target step (16-84% over "
                  f"bootstrap refits).", "",
                  "| run | reference | gap at first eval | gap at target | switch at step | 16-84% |",
                  "|---|---|---|---|---|---|"]
        for s in switch_rows:
            if s["not_extrapolated"]:
                lines.append(f"| {Path(s['run']).name} | {Path(s['reference']).name} | | | none: "
                             f"{s['not_extrapolated']} | |")
                continue
            step = "no need before the target step" if math.isnan(s["step"]) else f"{s['step']:,.0f}"
            band = "-" if math.isnan(s["p16"]) else f"{s['p16']:,.0f} - " + (
                "beyond" if math.isinf(s["p84"]) else f"{s['p84']:,.0f}")
            lines.append(f"| {Path(s['run']).name} | {Path(s['reference']).name} | {s['gap_at_start']:+.4f} | "
                         f"{s['gap_at_end']:+.4f} | {step} | {band} |")
    text = "\n".join(lines) + "\n"
    write_text(out / "fits.md", text)
    for name, rows in (("fits.csv", fit_rows), ("switch.csv", switch_rows)):
        keys = list(dict.fromkeys(k for row in rows for k in row)) or ["run"]
        with atomic_open(out / name, newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows([{k: v for k, v in row.items() if not isinstance(v, list)} | (
                {"range": "-".join(f"{x:.0f}" for x in row["range"])} if "range" in row else {}) for row in rows])
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
