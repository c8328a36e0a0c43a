"""Figures of a probe analysis (matplotlib, PNG): accuracy and selectivity against depth, CKA heatmaps."""

from pathlib import Path

import matplotlib

from locallearn.atomic import save_figure

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _by_depth(rows, label, key):
    """Trunk layers (embed, blocks) of one model: depths and values; heads separately."""
    sub = [r for r in rows if r["label"] == label and r["split"] == "test" and r.get(key) is not None]
    trunk = sorted((r["depth"], r[key]) for r in sub if not r["layer"].startswith("head"))
    heads = sorted((r["depth"], r[key]) for r in sub if r["layer"].startswith("head"))
    return trunk, heads


def _depth_plot(rows, models, key, ylabel, title, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, model in enumerate(models):
        color = f"C{i}"
        trunk, heads = _by_depth(rows, model.label, key)
        if not trunk:
            continue
        style = ":" if model.run.ckpt is None else "-"
        ax.plot(*zip(*trunk), style, marker="o", color=color, label=model.label)
        if heads and model.chunks > 1:
            ax.plot(*zip(*heads), linestyle="none", marker="x", color=color, markersize=8)
        for chunk in list(model.run.net.plan)[:-1]:  # chunk boundaries: after each chunk's last block
            ax.axvline(chunk.layers[-1] + 1, color=color, linestyle="--", alpha=0.35, linewidth=1)
    ax.set_xlabel("depth (blocks below; 0 = embedding)   o trunk  x head features   -- chunk boundary")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _heatmap(label, ref_label, values, nulls, path: Path) -> Path:
    rows = list(dict.fromkeys(a for a, _ in values))
    cols = list(dict.fromkeys(b for _, b in values))
    grid = np.array([[values[(a, b)] for b in cols] for a in rows])
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(cols), 1.0 + 0.5 * len(rows)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xlabel(ref_label)
    ax.set_ylabel(label)
    null = np.nanmax(np.abs(list(nulls.values())))
    ax.set_title(f"CKA: {label} vs {ref_label}\nshuffled-pairing null: |CKA| <= {null:.2f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in label).strip("_")


def plot_all(rows, models, cka_of, task: str, out_dir: Path) -> dict[str, Path]:
    """Write the figures into ``out_dir``; return {tag: path}. ``cka_of``: {label: (values, nulls)}."""
    figures = {
        "accuracy": _depth_plot(rows, models, "accuracy", f"{task} probe accuracy (test)",
                                f"{task}: probe accuracy by depth", out_dir / "accuracy_vs_depth.png"),
    }
    if any(r.get("selectivity") is not None for r in rows):
        figures["selectivity"] = _depth_plot(rows, models, "selectivity", "selectivity (task - control accuracy)",
                                             f"{task}: selectivity by depth", out_dir / "selectivity_vs_depth.png")
    for model in models:
        if model.label in cka_of and model.reference is not model:
            values, nulls = cka_of[model.label]
            figures[f"cka/{model.label}"] = _heatmap(model.label, model.reference.label, values, nulls,
                                                     out_dir / f"cka_{_slug(model.label)}.png")
    return figures
