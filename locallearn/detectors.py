"""Detectors over one chunk's loss stream: spikes, rising loss, plateaus, overfitting, underfitting.

Plain functions of (steps, values), so they run on synthetic curves in tests as on a finished run.
They find patterns in numbers and nothing more; :mod:`locallearn.diagnostics` turns them into
findings with causes and remedies, using what the run knows.
"""

import math

import numpy as np

Curve = tuple[list[int], list[float]]  # (steps, values)


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
