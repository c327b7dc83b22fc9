"""Accuracy-vs-cost plots (PNG) from the ``curves`` an evaluation returns."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from kdedge.io import atomic_write


def plot_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: str | Path, *,
                xlabel: str = "multiply-adds (MACs)", title: str = "accuracy vs cost") -> Path:
    """One line per curve of ``[x, accuracy]`` points (accuracy in [0, 1]), saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, pts in curves.items():
        if not pts:
            continue
        xs, ys = zip(*[(p[0], 100.0 * p[1]) for p in pts])
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return Path(path)
