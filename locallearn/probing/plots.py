"""Figures of a probe analysis (matplotlib, PNG): accuracy and selectivity against depth, CKA heatmaps."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _by_depth(rows, run, key):
    """Trunk layers (embed, blocks) of one run: depths and values; heads separately."""
    sub = [r for r in rows if r["run"] == run and r["split"] == "test" and r.get(key) is not None]
    trunk = sorted((r["depth"], r[key]) for r in sub if not r["layer"].startswith("head"))
    heads = sorted((r["depth"], r[key]) for r in sub if r["layer"].startswith("head"))
    return trunk, heads


def _depth_plot(rows, models, key, ylabel, title, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, model in enumerate(models):
        color = f"C{i}"
        trunk, heads = _by_depth(rows, model.run.name, key)
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _heatmap(label, ref_label, matrix, path: Path) -> Path:
    (rows, cols), values = matrix
    grid = np.array([[values[(a, b)] for b in cols] for a in rows])
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(cols), 1.0 + 0.5 * len(rows)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xlabel(ref_label)
    ax.set_ylabel(label)
    ax.set_title(f"CKA: {label} vs {ref_label}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in label).strip("_")


def plot_all(rows, models, cka_of, ref_label, task: str, out_dir: Path) -> dict[str, Path]:
    """Write the figures into ``out_dir``; return {tag: path}."""
    figures = {
        "accuracy": _depth_plot(rows, models, "accuracy", f"{task} probe accuracy (test)",
                                f"{task}: probe accuracy by depth", out_dir / "accuracy_vs_depth.png"),
    }
    if any(r.get("selectivity") is not None for r in rows):
        figures["selectivity"] = _depth_plot(rows, models, "selectivity", "selectivity (task - control accuracy)",
                                             f"{task}: selectivity by depth", out_dir / "selectivity_vs_depth.png")
    for label, matrix in cka_of.items():
        if label != ref_label:
            figures[f"cka/{label}"] = _heatmap(label, ref_label, matrix, out_dir / f"cka_{_slug(label)}.png")
    return figures
