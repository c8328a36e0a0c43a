"""Power-law fits of loss curves: L(t) = a * t^(-b) + c, with bootstrap uncertainty.

For a fixed exponent b the model is linear in (a, c), so the fit starts from the best b on a grid
(each solved by least squares), then refines all three with a robust loss (soft L1, scaled by the
residuals' MAD) so that one bad evaluation does not drag the curve. Uncertainty comes from a residual
bootstrap: the fit is repeated on the fitted curve plus resampled residuals, and the spread of the
refits gives standard errors of a, b, c and intervals for predictions far beyond the data.

A fit is extrapolated (a predicted loss, a switch step, a curve drawn past the data) only when that
means something: not when the learning rate changed under the fitted points (:func:`lr_note`: a
curve fitted while a cosine schedule anneals bends because the LR falls, and a power law carries
that bend on forever), and not when the data do not identify the fit (:attr:`PowerLaw.identified`).
:attr:`PowerLaw.not_extrapolated` says which, in words.

:func:`gap_crossing` answers "when should a local run switch to global training?": the step from which
the local run's predicted loss stays more than a tolerance above the end-to-end run's.
"""

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from locallearn.analysis.sweeps import LOCAL_KEYS, RunRecord, collect, read_curve
from locallearn.config import under

MIN_POINTS = 5  # three parameters and at least two degrees of freedom
LR_TOLERANCE = 0.05  # an LR whose range over the fitted steps exceeds this fraction of its peak is not constant


class CurveTooShort(ValueError):
    """Fewer usable points than a fit needs (a message for the user, not a crash)."""


def _model(p, t):
    a, b, c = p
    return a * t ** (-b) + c


def _grid_start(t, y) -> np.ndarray:
    best = None
    for b in np.linspace(0.05, 3.0, 60):
        X = np.stack([t ** (-b), np.ones_like(t)], axis=1)
        (a, c), *_ = np.linalg.lstsq(X, y, rcond=None)
        if a < 0:
            continue
        sse = float(np.sum((X @ [a, c] - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, np.array([a, b, max(c, 0.0)]))
    return best[1] if best is not None else np.array([max(y[0] - y[-1], 1e-6) * t[0] ** 0.5, 0.5, max(y[-1], 0.0)])


def _refine(t, y, p0, f_scale):
    lower, upper = [0.0, 0.0, 0.0], [np.inf, 5.0, np.inf]
    p0 = np.clip(p0, lower, [1e300, 5.0, 1e300])
    res = least_squares(lambda p: _model(p, t) - y, p0, bounds=(lower, upper), loss="soft_l1", f_scale=f_scale,
                        x_scale="jac", max_nfev=2000)
    return res.x


@dataclass
class PowerLaw:
    """A fitted L(t) = a t^-b + c; ``samples`` holds the bootstrap refits (S, 3)."""

    a: float
    b: float
    c: float
    a_std: float
    b_std: float
    c_std: float
    rmse: float  # of the central fit on the data
    n: int  # points fitted
    first_step: int
    last_step: int
    samples: np.ndarray
    spread: float = math.inf  # max - min of the fitted values: the loss range the curve spans
    schedule_note: str = ""  # why the LR under the fitted points rules out extrapolating (:func:`lr_note`), or ""

    def __call__(self, t):
        return _model((self.a, self.b, self.c), np.asarray(t, dtype=float))

    @property
    def identified(self) -> bool:
        """Whether the data pin the exponent and the asymptote down (b's standard error below b, c's below the
        range the curve spans). A curve that is not a power law (one that rises for a while, say) leaves them
        free, and its extrapolations mean little. (A curve that has flattened leaves a loose, which is fine.)"""
        return self.b_std < self.b and self.c_std < self.spread

    @property
    def not_extrapolated(self) -> str:
        """Why the fit must not be extrapolated beyond its data ("" when it may be)."""
        if self.schedule_note:
            return self.schedule_note
        if not self.identified:
            return (f"not identified: the data do not pin the exponent and the asymptote down (b = {self.b:.3f} "
                    f"± {self.b_std:.3f}, c = {self.c:.3f} ± {self.c_std:.3f})")
        return ""

    def predict(self, t: float) -> tuple[float, float, float, float]:
        """(central prediction, bootstrap std, 16th and 84th percentile) of the loss at step t."""
        draws = _model(self.samples.T, float(t))
        lo, hi = np.percentile(draws, [16, 84])
        return float(self(t)), float(np.std(draws)), float(lo), float(hi)

    def markdown_cells(self, predict_at: int | None = None) -> str:
        """``a | b | c | predicted loss | rmse |`` with standard errors, as markdown table cells (the prediction
        cell says why there is none when the fit is not extrapolated)."""
        if self.not_extrapolated:
            pred = f"not extrapolated: {self.not_extrapolated}"
        else:
            pred = "{:.4f} ± {:.4f}".format(*self.predict(predict_at)[:2]) if predict_at else ""
        return (f"{self.a:.3g} ± {self.a_std:.2g} | {self.b:.3f} ± {self.b_std:.3f} | "
                f"{self.c:.4f} ± {self.c_std:.4f} | {pred} | {self.rmse:.4f} |")

    def to_dict(self, predict_at: int | None = None) -> dict:
        out = {"a": self.a, "b": self.b, "c": self.c, "a_std": self.a_std, "b_std": self.b_std,
               "c_std": self.c_std, "asymptote": self.c, "rmse": self.rmse, "points": self.n,
               "identified": self.identified,
               "steps": [self.first_step, self.last_step]}
        if self.not_extrapolated:
            out["not_extrapolated"] = self.not_extrapolated
        elif predict_at:
            mean, std, lo, hi = self.predict(predict_at)
            out["predicted"] = {"step": int(predict_at), "loss": mean, "std": std, "p16": lo, "p84": hi}
        return out


def fit_power_law(steps, values, n_boot: int = 200, seed: int = 0) -> PowerLaw:
    """Fit L(t) = a t^-b + c to (steps, values); raise :class:`CurveTooShort` with a message if it cannot."""
    t = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(y) & (t > 0)
    t, y = t[keep], y[keep]
    if len(t) < MIN_POINTS:
        raise CurveTooShort(f"{len(t)} usable point{'s' * (len(t) != 1)} (step > 0, finite loss); a power-law fit "
                            f"needs at least {MIN_POINTS}: evaluate more often (trainer.val_check_interval) or train "
                            f"longer")
    p = _grid_start(t, y)
    resid = _model(p, t) - y
    f_scale = max(1.4826 * float(np.median(np.abs(resid - np.median(resid)))), 1e-6 * float(np.mean(np.abs(y))), 1e-12)
    p = _refine(t, y, p, f_scale)
    fitted = _model(p, t)
    resid = y - fitted
    rng = np.random.default_rng(seed)
    centred = resid - resid.mean()
    samples = np.array([_refine(t, fitted + rng.choice(centred, size=len(t), replace=True), p, f_scale)
                        for _ in range(n_boot)])
    std = samples.std(axis=0)
    return PowerLaw(float(p[0]), float(p[1]), float(p[2]), float(std[0]), float(std[1]), float(std[2]),
                    float(np.sqrt(np.mean(resid ** 2))), len(t), int(t[0]), int(t[-1]), samples,
                    float(y.max() - y.min()))


def lr_note(lr, first_step: int, last_step: int, tol: float = LR_TOLERANCE) -> str:
    """Why the learning rate a chunk used rules out extrapolating a fit of its val points from ``first_step``
    to ``last_step`` ("" if it does not); ``lr`` is the (steps, LR) the run recorded, or None.

    The rule: the LR at the recorded steps among the fitted ones, from the end of warmup on (the first step at
    which the LR comes within ``tol`` of its peak), must stay within ``tol`` x its largest value there. A cosine
    or one-cycle schedule that decays to the end fails it ("decays": it only falls there), and so does a cyclic
    or hypergradient LR ("varies"). Fewer than two recorded steps in that range is no evidence either way (a
    run that logged no LR passes)."""
    if not lr or not len(lr[0]):
        return ""
    steps, values = np.asarray(lr[0]), np.asarray(lr[1], dtype=float)
    warm = steps[np.argmax(values >= (1 - tol) * np.nanmax(values))]
    fitted = (steps >= first_step) & (steps <= last_step)
    after = fitted & (steps >= warm)
    span = values[after if after.sum() >= 2 else fitted]  # fitted points all in warmup: the rising LR counts
    if len(span) < 2 or np.nanmax(span) - np.nanmin(span) <= tol * np.nanmax(span):
        return ""
    top, end = float(np.nanmax(span)), float(span[-1])
    if np.all(np.diff(span) <= 1e-3 * top):  # it only falls (float32 rounding in TensorBoard aside)
        return (f"the learning rate decays to the end of the run (from {top:.2e} to {end:.2e} over the fitted "
                f"steps), so the curve's end follows the schedule; fit a constant-LR run (schedule=constant) "
                f"to extrapolate")
    return (f"the learning rate varies over the fitted steps (between {np.nanmin(span):.2e} and {top:.2e}), so "
            f"the curve follows the schedule as much as the learning; fit a constant-LR run (schedule=constant) "
            f"to extrapolate")


def fit_curves(curves: dict, lr: dict | None = None) -> dict:
    """chunk -> PowerLaw for each (steps, values) curve, or the message saying why it could not be fitted;
    ``lr`` (chunk -> (steps, LR) as recorded) decides whether each fit may be extrapolated (:func:`lr_note`)."""
    fits = {}
    for k, (steps, values) in curves.items():
        try:
            fits[k] = fit_power_law(steps, values)
        except CurveTooShort as e:
            fits[k] = str(e)
            continue
        fits[k].schedule_note = lr_note((lr or {}).get(k), fits[k].first_step, fits[k].last_step)
    return fits


def _stays_above(gap: np.ndarray, grid: np.ndarray, tol: float) -> float:
    """The first grid step from which the gap stays above tol up to the end; nan if it ends below."""
    above = gap > tol
    if not above[-1]:
        return math.nan
    below = np.nonzero(~above)[0]
    return float(grid[below[-1] + 1]) if len(below) else float(grid[0])


def gap_crossing(local: PowerLaw, e2e: PowerLaw, tol: float, t_from: float, t_to: float, n: int = 500) -> dict:
    """The step in [t_from, t_to] from which local(t) - e2e(t) stays above tol (the local run has fallen
    behind for good), by the central fits, with the 16th-84th percentile range over paired bootstrap
    refits; nan when the predicted gap at t_to is within the tolerance."""
    grid = np.geomspace(max(t_from, 1.0), t_to, n)
    central = _stays_above(local(grid) - e2e(grid), grid, tol)
    m = min(len(local.samples), len(e2e.samples))
    per_sample = np.array([_stays_above(_model(local.samples[i], grid) - _model(e2e.samples[i], grid), grid, tol)
                           for i in range(m)])
    crossed = np.isfinite(per_sample)
    # A bootstrap refit that never crosses counts as crossing after t_to, so that it widens the range.
    filled = np.where(crossed, per_sample, np.inf)
    lo, hi = np.percentile(filled, [16, 84], method="inverted_cdf") if m else (math.nan, math.nan)
    gap_end = float(local(t_to) - e2e(t_to))
    return {"tolerance": tol, "step": central, "p16": float(lo), "p84": float(hi),
            "fraction_crossing": float(crossed.mean()) if m else math.nan, "range": [float(grid[0]), float(t_to)],
            "gap_at_start": float(local(grid[0]) - e2e(grid[0])), "gap_at_end": gap_end}


# -- on finished runs (analysis/fit_curves.py) ------------------------------------------------------

@dataclass
class RunFits:
    """The fits of one run's per-chunk val curves."""

    run: RunRecord
    curves: dict  # chunk -> (steps, values)
    fits: dict  # chunk -> PowerLaw, or the message saying why it could not be fitted
    predict_at: int


def fit_runs(paths, predict_at: int | None = None) -> list[RunFits]:
    """Fit every chunk's val curve of every run under ``paths`` (runs or multiruns), each judged for
    extrapolation by the LR its chunk logged (``train/lr/chunk{k}``)."""

    def columns(points):
        return [s for s, _ in points], [v for _, v in points]

    out = []
    for record in collect(paths):
        curves, lr = {}, {}
        for k in range(1, 1 + int(record.summary.get("chunks") or 64)):
            curve = read_curve(record.dir, f"val/loss/chunk{k}")
            if not curve:
                break
            curves[k] = columns(curve)
            lr[k] = columns(read_curve(record.dir, f"train/lr/chunk{k}"))
        fits = fit_curves(curves, lr)
        last = max((s[-1] for s, _ in curves.values()), default=0)
        out.append(RunFits(record, curves, fits, predict_at or 10 * max(last, 1)))
    return out


def reference_for(run: RunFits, candidates: list[RunFits]) -> RunFits | None:
    """The end-to-end run (chunks=1) with the same overrides, seed included, but for the chunk settings."""

    def rest(r):
        return {k: v for k, v in r.run.overrides.items() if not under(k, LOCAL_KEYS)}

    # compare.read_run drops seed= from the overrides (it groups seeds), so the seed is matched on its own
    return next((c for c in candidates if c is not run and len(c.curves) == 1 and rest(c) == rest(run)
                 and c.run.seed == run.run.seed), None)
