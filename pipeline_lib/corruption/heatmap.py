"""Accuracy heatmap of one model: corruptions (rows) x severities (columns), plus each row's mean."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io import atomic_path
from .config import SEVERITIES


def plot_heatmap(table: Mapping[str, Sequence[float]], path: str | Path, *, title: str,
                 extra: Sequence[str] = ()) -> None:
    """`table[name][s - 1]` = accuracy (fraction) at severity s. Rows of `extra` corruptions are
    drawn below a line (they are not in the mean corruption accuracy). Colours span 0-100 %
    for every model, so heatmaps of different models compare at a glance."""
    names = [m for m in table if m not in extra] + [m for m in table if m in extra]
    if not names:
        raise ValueError("empty accuracy table")
    acc = np.array([[*table[m], float(np.mean(table[m]))] for m in names]) * 100   # (rows, 5 + 1)
    fig = Figure(figsize=(6.4, 0.34 * len(names) + 1.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(acc, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (r, c), v in np.ndenumerate(acc):
        ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
    ax.set_xticks(range(len(SEVERITIES) + 1), [str(s) for s in SEVERITIES] + ["mean"])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("severity")
    ax.axvline(len(SEVERITIES) - 0.5, color="white", lw=2)
    n_standard = len(names) - sum(m in extra for m in names)
    if 0 < n_standard < len(names):
        ax.axhline(n_standard - 0.5, color="white", lw=2)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy (%)", fraction=0.05)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
