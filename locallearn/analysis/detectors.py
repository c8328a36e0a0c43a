"""Detectors over one chunk's loss stream: spikes, rising loss, plateaus, overfitting, underfitting.

Plain functions of (steps, values), so they run on synthetic curves in tests as on a finished run.
They find patterns in numbers and nothing more; :mod:`locallearn.analysis.diagnose` turns them into
findings with causes and remedies, using what the run knows.
"""

import math
from dataclasses import dataclass

import numpy as np

from locallearn.errors import ConfigError

Curve = tuple[list[int], list[float]]  # (steps, values)


@dataclass
class Thresholds:
    """The detectors' settings (``callbacks.diagnostics.*`` in the config)."""

    diverge_ratio: float = 1.5  # divergence: smoothed train loss above this x the chunk's starting loss
    diverge_window: int = 20  # steps in the median that smooths the train loss for the divergence test
    spike_z: float = 6.0  # spike: robust z-score above this
    spike_window: int = 50  # earlier steps the z-score's median and MAD are taken over
    plateau_evals: int = 3  # plateau / overfitting: evaluations looked at
    plateau_rel: float = 0.002  # plateau: best val loss improved by less than this fraction over plateau_evals
    underfit_margin: float = 0.05  # underfitting: train loss above (1 - margin) x unigram entropy after warmup
    rise_window: int = 100  # rising loss: steps per window whose median train loss is compared
    rise_rel: float = 0.02  # rising loss: medians above this fraction over the best earlier one, 2 windows running


def check_thresholds(th: Thresholds):
    """Raise a one-sentence ConfigError for a threshold that cannot work."""
    rules = [("diverge_ratio", th.diverge_ratio > 1, "above 1 (a multiple of the starting loss)"),
             ("diverge_window", th.diverge_window >= 1, "at least 1"),
             ("spike_z", th.spike_z > 0, "positive"),
             ("spike_window", th.spike_window >= 10, "at least 10 (steps the median and MAD are taken over)"),
             ("plateau_evals", th.plateau_evals >= 1, "at least 1"),
             ("plateau_rel", th.plateau_rel >= 0, "at least 0"),
             ("underfit_margin", 0 <= th.underfit_margin < 1, "in [0, 1)"),
             ("rise_window", th.rise_window >= 10, "at least 10"),
             ("rise_rel", th.rise_rel > 0, "positive")]
    for name, ok, expected in rules:
        if not ok:
            raise ConfigError(f"callbacks.diagnostics.{name}={getattr(th, name)} must be {expected}.")



def robust_z(values, window: int) -> np.ndarray:
    """z[i] = (x[i] - median(x[i-window:i])) / (1.4826 MAD of the same window); nan where fewer than 10
    earlier values exist. The scale has a floor (1e-3 of the median) so that a flat stretch of values
    does not turn every tiny wiggle into a spike."""
    x = np.asarray(values, dtype=float)
    z = np.full(len(x), np.nan)
    for i in range(10, len(x)):
        w = x[max(0, i - window):i]
        w = w[np.isfinite(w)]
        if len(w) < 10:
            continue
        med = np.median(w)
        scale = max(1.4826 * np.median(np.abs(w - med)), 1e-3 * abs(med), 1e-12)
        z[i] = (x[i] - med) / scale
    return z


def find_spikes(steps, values, window: int = 50, z: float = 6.0) -> list[tuple[int, float, float]]:
    """(step, value, z-score) of every upward spike; consecutive spiking steps count as one spike
    (its highest point)."""
    scores = robust_z(values, window)
    out, run = [], []
    for i, s in enumerate(scores):
        if np.isfinite(s) and s > z:
            run.append(i)
            continue
        if run:
            j = max(run, key=lambda r: scores[r])
            out.append((int(steps[j]), float(values[j]), float(scores[j])))
            run = []
    if run:
        j = max(run, key=lambda r: scores[r])
        out.append((int(steps[j]), float(values[j]), float(scores[j])))
    return out


def find_rising(steps, values, window: int = 100, rel: float = 0.02) -> list[tuple[int, int, float, float]]:
    """Stretches of at least two consecutive windows of ``window`` steps whose median train loss exceeds the
    lowest median of the earlier windows by more than ``rel`` (relative): (first step, last step, the best
    earlier median, the highest median of the stretch)."""
    ts, v = np.asarray(steps), np.asarray(values, dtype=float)
    if len(ts) < 2 * window:
        return []
    n = len(ts) // window
    medians = [float(np.nanmedian(v[i * window:(i + 1) * window])) for i in range(n)]
    out, best, i = [], medians[0], 1
    while i < n:
        if medians[i] > (1 + rel) * best:
            j = i
            while j + 1 < n and medians[j + 1] > (1 + rel) * best:
                j += 1
            if j > i:  # two windows or more: not one unlucky stretch of batches
                out.append((int(ts[i * window]), int(ts[min((j + 1) * window, len(ts)) - 1]), best,
                            max(medians[i:j + 1])))
            best = min(best, *medians[i:j + 1])
            i = j + 1
            continue
        best = min(best, medians[i])
        i += 1
    return out


def find_plateaus(steps, values, evals: int = 3, rel: float = 0.002) -> list[tuple[int, int, float]]:
    """Stretches of evaluations over which the best val loss improved by less than ``rel`` (relative)
    within every window of ``evals`` evaluations: (first step, last step, improvement over the stretch)."""
    v = np.asarray(values, dtype=float)
    flat = []  # (i0, i1): windows of evals+1 points ending at i1 whose best improved by less than rel
    for i in range(evals, len(v)):
        before = np.min(v[:i - evals + 1])
        after = np.min(v[i - evals + 1:i + 1])
        if np.isfinite(before) and (before - after) < rel * abs(before):
            flat.append((i - evals, i))
    merged = []
    for i0, i1 in flat:
        if merged and i0 <= merged[-1][1]:
            merged[-1] = (merged[-1][0], i1)
        else:
            merged.append((i0, i1))
    out = []
    for i0, i1 in merged:
        improvement = (np.min(v[:i0 + 1]) - np.min(v[:i1 + 1])) / abs(np.min(v[:i0 + 1]))
        out.append((int(steps[i0]), int(steps[i1]), float(improvement)))
    return out


def train_at_evals(train: Curve, val_steps) -> list[float]:
    """Mean train loss over the steps since the previous evaluation, at each evaluation step."""
    ts, tv = np.asarray(train[0]), np.asarray(train[1], dtype=float)
    out, prev = [], -math.inf
    for s in val_steps:
        sel = (ts > prev) & (ts <= s) & np.isfinite(tv)
        out.append(float(tv[sel].mean()) if sel.any() else math.nan)
        prev = s
    return out


def find_overfitting(train: Curve, val: Curve, evals: int = 3) -> list[tuple[int, int, float, float]]:
    """Stretches where the val loss rose at each of ``evals`` consecutive evaluations while the train
    loss fell: (first step, last step, val rise, slope of the val - train gap per 1,000 steps)."""
    steps, v = list(val[0]), np.asarray(val[1], dtype=float)
    t = np.asarray(train_at_evals(train, steps))
    out = []
    i = evals
    while i < len(v):
        window = slice(i - evals, i + 1)
        rising = np.all(np.diff(v[window]) > 0)
        falling = np.isfinite(t[window]).all() and t[i] < t[i - evals]
        if not (rising and falling):
            i += 1
            continue
        j = i  # extend while it goes on
        while j + 1 < len(v) and v[j + 1] > v[j] and np.isfinite(t[j + 1]) and t[j + 1] < t[j]:
            j += 1
        s = np.asarray(steps[i - evals:j + 1], dtype=float)
        gap = v[i - evals:j + 1] - t[i - evals:j + 1]
        slope = float(np.polyfit(s, gap, 1)[0] * 1000) if len(s) > 1 else math.nan
        out.append((int(steps[i - evals]), int(steps[j]), float(v[j] - v[i - evals]), slope))
        i = j + 1
    return out


def underfitting(train: Curve, baseline: float, after_step: int, margin: float = 0.05):
    """(first step, last step, mean train loss) of the last tenth of the steps after ``after_step`` if that
    mean is not below (1 - margin) x ``baseline``; None otherwise (or when there is nothing after warmup)."""
    ts, tv = np.asarray(train[0]), np.asarray(train[1], dtype=float)
    late = ts > after_step
    if late.sum() < 10:
        return None
    ts, tv = ts[late], tv[late]
    tail = slice(len(ts) - max(10, len(ts) // 10), None)
    mean = float(np.nanmean(tv[tail]))
    if mean < (1 - margin) * baseline:
        return None
    return int(ts[tail][0]), int(ts[-1]), mean


# -- online divergence test --------------------------------------------------------------------------

class DivergenceWatch:
    """Fed one loss per chunk and step; says when a chunk diverges (see :func:`check`)."""

    def __init__(self, ratio: float = 1.5, window: int = 20, start_steps: int = 10):
        self.ratio, self.window, self.start_steps = ratio, window, start_steps
        self.recent: dict[int, list[float]] = {}
        self.start: dict[int, float] = {}

    def check(self, chunk: int, loss: float) -> str | None:
        """The evidence if chunk ``chunk`` has diverged with this loss, else None."""
        if not math.isfinite(loss):
            return f"train loss is {loss}"
        recent = self.recent.setdefault(chunk, [])
        recent.append(loss)
        del recent[:-self.window]
        if chunk not in self.start:
            if len(recent) >= self.start_steps:
                self.start[chunk] = float(np.median(recent[:self.start_steps]))
            return None
        smoothed = float(np.median(recent))
        if smoothed > self.ratio * self.start[chunk]:
            return (f"median train loss over the last {len(recent)} steps is {smoothed:.3f}, above "
                    f"{self.ratio:g} x its starting value {self.start[chunk]:.3f}")
        return None

    def state_dict(self) -> dict:
        return {"recent": self.recent, "start": self.start}

    def load_state_dict(self, state: dict):
        self.recent = {int(k): list(v) for k, v in state.get("recent", {}).items()}
        self.start = {int(k): float(v) for k, v in state.get("start", {}).items()}


def warmup_end(lr: dict) -> int:
    """The step at which the LR first reaches its peak (the end of any warmup), at most half the run."""
    ends = []
    for steps, values in lr.values():
        if values:
            peak = max(values)
            first = next(s for s, v in zip(steps, values) if v >= 0.99 * peak)
            ends.append(min(first, steps[len(steps) // 2]))
    return max(ends) if ends else 0
