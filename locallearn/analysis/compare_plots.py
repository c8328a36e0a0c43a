"""Figures of a sweep report (matplotlib, PNG): validation curves, loss by chunk depth, loss against wall time, the
share of the depth benefit kept (against K, and against activation memory)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from locallearn.analysis import depth_benefit  # noqa: E402
from locallearn.analysis.sweeps import Group, common_items, label, read_curves  # noqa: E402
from locallearn.atomic import save_figure  # noqa: E402


def _namer(all_groups):
    common = common_items(all_groups)
    return lambda g: label(g.key, common)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def val_curves(all_groups: list[Group], path: Path, answers: bool = False) -> Path:
    """The last chunk's val loss (or, ``answers``, its answer accuracy) against step: mean over seeds, band from
    min to max."""
    name = _namer(all_groups)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(all_groups):
        curves = [dict(r.answer_curve if answers else r.curve) for r in g.done if (r.answer_curve if answers
                                                                                  else r.curve)]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[s] for s in steps] for c in curves])
        ax.plot(steps, values.mean(0), color=f"C{i}", label=f"{name(g)} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=f"C{i}", alpha=0.2)
    what = "answer accuracy" if answers else "val loss"
    ax.set_xlabel("step")
    ax.set_ylabel(f"last chunk's {what}")
    ax.set_title(f"validation {what} (mean over seeds, band: min to max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def loss_by_depth(all_groups: list[Group], path: Path) -> Path:
    """Final val loss of each chunk at the depth where the chunk ends, one line per group."""
    name = _namer(all_groups)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(all_groups):
        if not g.done:
            continue
        ends = [layers[-1] + 1 for layers in g.done[0].summary.get("layers", [])]
        stats = g.chunk_losses()
        if len(ends) != len(stats) or any(s is None for s in stats):
            continue
        means = [m for m, _ in stats]
        errs = [0 if np.isnan(s) else s for _, s in stats]
        style = dict(marker="s", markersize=9, linestyle="none") if g.chunks == 1 else dict(marker="o")
        ax.errorbar(ends, means, yerr=errs, color=f"C{i}", capsize=3, label=name(g), **style)
    ax.set_xlabel("depth at the end of the chunk (blocks)")
    ax.set_ylabel("final val loss of the chunk")
    ax.set_title("final val loss by chunk depth (end-to-end: squares)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def loss_vs_wall(all_groups: list[Group], path: Path) -> Path:
    name = _namer(all_groups)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(all_groups):
        last, wall = g.last(), g.stat(lambda s: s.get("wall_time_s"))
        if not last or not wall:
            continue
        ax.errorbar(wall[0], last[0], xerr=0 if np.isnan(wall[1]) else wall[1],
                    yerr=0 if np.isnan(last[1]) else last[1], marker="o", color=f"C{i}", capsize=3,
                    label=name(g))
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("last chunk's final val loss")
    ax.set_title("final loss against wall time (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def kept_by_chunks(rows, name, path: Path) -> Path:
    """The share of the depth benefit kept against K, one point per local group (with its 95% interval over
    seeds), on the loss and, for tasks, on answer accuracy; groups where depth buys nothing are left out."""
    metrics = [m for m in ("loss", "answer_acc") if any(m in r.results for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        shown = [(r, r.results[metric]) for r in rows if metric in r.results and r.results[metric].clear]
        for i, (r, k) in enumerate(shown):
            ci = k.interval()
            err = [[100 * (k.mean - ci[0])], [100 * (ci[1] - k.mean)]] if ci else None
            x = r.local.chunks + 0.08 * (i - (len(shown) - 1) / 2)  # groups at one K side by side
            ax.errorbar(x, 100 * k.mean, yerr=err, marker="o", capsize=3, color=f"C{i}", label=name(r.local))
        unclear = sorted({r.local.chunks for r in rows if metric in r.results and not r.results[metric].clear})
        for K in unclear:  # said, not plotted: the ratio is noise over noise there
            ax.annotate("n/a: depth buys\nnothing measurable", (K, 50), ha="center", fontsize=7, color="grey")
        ks = sorted({r.local.chunks for r in rows})
        ax.set_xticks(ks)
        ax.set_xlim(ks[0] - 0.6, ks[-1] + 0.6)
        ax.axhline(100, color="grey", lw=0.8, ls="--")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("chunks K")
        ax.set_ylabel("kept (%)")
        ax.set_title(f"share of the depth benefit kept ({'val loss' if metric == 'loss' else 'answer accuracy'})")
        ax.grid(alpha=0.3)
        if shown:
            ax.legend(fontsize=7)
    return _save(fig, path)


def kept_vs_memory(points: list[dict], path: Path) -> Path:
    """The trade-off: the share of the depth benefit kept (mean and 95% interval over seeds) against the memory a
    training step holds relative to end to end; one point per way of training (``points``: name, memory, and per
    metric ``kept``, ``low``, ``high`` in %, or None), the two end-to-end references at 0% and 100%."""
    metrics = [m for m in ("loss", "answer_acc") if any(p.get(m) for p in points)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, p in enumerate(q for q in points if q.get(metric)):
            k = p[metric]
            err = [[k["kept"] - k["low"]], [k["high"] - k["kept"]]] if k.get("low") is not None else None
            ax.errorbar(p["memory"], k["kept"], yerr=err, marker="s" if p.get("reference") else "o", capsize=3,
                        color="grey" if p.get("reference") else f"C{i}", label=p["name"])
        ax.axhline(100, color="grey", lw=0.8, ls="--")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("activation memory of a training step (mode=sequential), vs end to end")
        ax.set_ylabel("kept (%)")
        ax.set_title(f"kept vs activation memory ({'val loss' if metric == 'loss' else 'answer accuracy'})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


COSINE = "train/synthetic/cosine/chunk{}"


def synthetic_cosines(all_groups: list[Group], path: Path, smooth: int = 10) -> Path | None:
    """Synthetic gradients: the cosine between each predictor's guess and the true gradient message against step, one
    line per chunk boundary (mean over seeds, a moving average over ``smooth`` logged steps), a panel per group that
    logs them; None when no run does."""
    panels = []
    for g in all_groups:
        tags = [COSINE.format(k) for k in range(1, g.chunks)]
        curves = [read_curves(r.dir, tags) for r in g.done]
        if any(c[t] for c in curves for t in tags):
            panels.append((g, tags, curves))
    if not panels:
        return None
    name = _namer(all_groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (g, tags, curves) in zip(axes[0], panels):
        for k, tag in enumerate(tags, start=1):
            runs = [dict(c[tag]) for c in curves if c[tag]]
            steps = sorted(set.intersection(*(set(r) for r in runs)))
            mean = np.array([[r[s] for s in steps] for r in runs]).mean(0)
            w = min(smooth, len(mean))
            ax.plot(steps[w - 1:], np.convolve(mean, np.ones(w) / w, mode="valid"), color=f"C{k - 1}",
                    label=f"chunk {k} (from chunk {k + 1}), n={len(runs)}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("cosine(predicted, true gradient)")
        ax.set_title(f"synthetic gradients: {name(g)}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_all(all_groups: list[Group], out: Path) -> dict[str, Path]:
    out = Path(out)
    figures = {"val_curves": val_curves(all_groups, out / "val_curves.png"),
               "loss_by_depth": loss_by_depth(all_groups, out / "loss_by_depth.png"),
               "loss_vs_wall": loss_vs_wall(all_groups, out / "loss_vs_wall.png")}
    if any(r.answer_curve for g in all_groups for r in g.done):
        figures["answer_curves"] = val_curves(all_groups, out / "answer_curves.png", answers=True)
    cosines = synthetic_cosines(all_groups, out / "synthetic_cosines.png")
    if cosines is not None:
        figures["synthetic_cosines"] = cosines
    rows = depth_benefit.rows(all_groups)
    if rows:
        figures["kept_by_chunks"] = kept_by_chunks(rows, _namer(all_groups), out / "kept_by_chunks.png")
    return figures
