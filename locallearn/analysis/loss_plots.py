"""Figures of the loss tester (matplotlib, PNG): power-law fits of val curves, LR range tests."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from locallearn.atomic import save_figure  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def fit_steps(fit, predict_at: int | None = None, n: int = 200) -> np.ndarray:
    """The steps a fit's curve is drawn at: from its first fitted step to ``predict_at``, or only to its last
    fitted step when the fit is not extrapolated (``fit.not_extrapolated``): its continuation would mean nothing."""
    end = fit.last_step if fit.not_extrapolated else max(predict_at or 0, fit.last_step)
    return np.geomspace(fit.first_step, end, n)


def curve_fit_figure(curves: dict[int, tuple[list, list]], fits: dict, predict_at: int | None = None,
                     title: str = "val loss and power-law fits"):
    """Each chunk's val points and its fit L(t) = a t^-b + c (16-84% band) over :func:`fit_steps`; ``fits``
    maps chunk -> PowerLaw (chunks whose curve could not be fitted are drawn as points only). The prediction
    step gets a dotted line only if some fit reaches it."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    extrapolated = False
    for i, k in enumerate(sorted(curves)):
        steps, values = curves[k]
        ax.plot(steps, values, "o", color=f"C{i}", markersize=4, label=f"chunk {k}")
        fit = fits.get(k)
        if fit is None:
            continue
        t = fit_steps(fit, predict_at)
        extrapolated |= not fit.not_extrapolated
        ax.plot(t, fit(t), "-", color=f"C{i}", linewidth=1,
                label=f"  fit: {fit.a:.3g} t^-{fit.b:.3f} + {fit.c:.3f}"
                      + (" (not extrapolated)" if fit.not_extrapolated else ""))
        draws = np.array([fit.samples[j, 0] * t ** (-fit.samples[j, 1]) + fit.samples[j, 2]
                          for j in range(len(fit.samples))])
        if len(draws):
            lo, hi = np.percentile(draws, [16, 84], axis=0)
            ax.fill_between(t, lo, hi, color=f"C{i}", alpha=0.15, linewidth=0)
    if predict_at and extrapolated:
        ax.axvline(predict_at, color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def curve_fits(curves: dict[int, tuple[list, list]], fits: dict, path: Path, predict_at: int | None = None,
               title: str = "val loss and power-law fits") -> Path:
    """:func:`curve_fit_figure`, written to ``path`` (PNG)."""
    return _save(curve_fit_figure(curves, fits, predict_at, title), path)


def lr_range(results, path: Path) -> Path:
    """Each chunk's smoothed loss against the learning rate (log scale), with its two suggestions."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lows = []
    for i, r in enumerate(results):
        ax.plot(r.lrs, r.smoothed, color=f"C{i}", label=f"chunk {r.chunk}")
        lows.append(min(r.smoothed))
        for lr, marker in ((r.steepest, "o"), (r.min_loss_lr / 10, "^")):
            j = int(np.argmin(np.abs(np.log(np.asarray(r.lrs)) - np.log(lr))))
            ax.plot(r.lrs[j], r.smoothed[j], marker, color=f"C{i}", markersize=7, markerfacecolor="none")
    if results:
        start = max(r.smoothed[0] for r in results)
        ax.set_ylim(min(lows) - 0.1 * (start - min(lows)) - 1e-3, start + 0.5 * (start - min(lows)) + 1e-3)
    ax.plot([], [], "ko", markerfacecolor="none", label="steepest descent")
    ax.plot([], [], "k^", markerfacecolor="none", label="min loss / 10")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed train loss")
    ax.set_title("LR range test, per chunk")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)
