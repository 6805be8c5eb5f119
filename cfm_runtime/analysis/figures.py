"""The figures (small PNGs, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 90


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def cdf(x: np.ndarray, curves: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Cumulative distribution curves over x (Figure 6)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, y in curves.items():
        ax.plot(x, y, label=name, lw=1.4 if name == "all layers" else 0.9)
    ax.set(xlabel="activation / max activation of the token", ylabel="fraction of activations", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def masking(levels: list[float], curves: dict[str, list[float]], path: Path, title: str) -> None:
    """Loss change vs fraction of lowest neurons masked per token (Figure 7)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, y in curves.items():
        ax.plot([100 * v for v in levels], y, marker="o", ms=3, label=name)
    ax.set(xlabel="% of lowest neurons masked per token", ylabel="loss change (nats/token)", title=title)
    ax.set_yscale("symlog", linthresh=0.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def layer_scores(summary: dict[str, np.ndarray], random: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Per-layer best and top-5% functionality scores (mean over functions) vs shuffled labels (Figure 8)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    layers = np.arange(summary["best"].shape[1])
    for key, style in (("best", "-"), ("top", "--")):
        label = "best" if key == "best" else "top-5% boundary"
        ax.plot(layers, summary[key].mean(0), style, color="C0", label=f"{label}")
        ax.plot(layers, random[key].mean(0), style, color="C3", label=f"{label}, shuffled labels")
    ax.set(xlabel="layer", ylabel="average precision", title=title, ylim=(0, 1.03))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def heatmap(matrix: np.ndarray, rows: list[str], cols: list[str], path: Path, title: str, fmt: str,
            xlabel: str = "", ylabel: str = "") -> None:
    """A labelled matrix with values printed in the cells (Figures 9 and 10)."""
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    im = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, format(matrix[i, j], fmt), ha="center", va="center", fontsize=6.5, color="w")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(im, ax=ax, shrink=0.8)
    _save(fig, path)


def bars(groups: list[str], series: dict[str, list[float]], path: Path, title: str, ylabel: str) -> None:
    """Grouped bars, one group per function (prefetch hit rates)."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    w = 0.8 / len(series)
    x = np.arange(len(groups))
    for k, (name, vals) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * w, vals, w, label=name)
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def bar_panels(groups: list[str], panels: list[tuple[str, str, dict[str, list[float]]]], path: Path,
               title: str) -> None:
    """Several grouped-bar panels stacked vertically: (panel title, y label, {series: values per group})."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True)
    x = np.arange(len(groups))
    for ax, (sub, ylabel, series) in zip(np.atleast_1d(axes), panels):
        w = 0.8 / len(series)
        for k, (name, vals) in enumerate(series.items()):
            ax.bar(x + (k - (len(series) - 1) / 2) * w, vals, w, label=name)
        ax.set(title=sub, ylabel=ylabel)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, ncol=len(panels[0][2]), loc="lower right")
    axes[-1].set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
