"""A PNG grid of what the corruptions look like: one row per corruption, the clean image then severities 1-5."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io import atomic_path
from .config import SEVERITIES
from .store import CorruptedSet


def sample_grid(cset: CorruptedSet, names: Sequence[str], path: str | Path, *, index: int = 0,
                clean: np.ndarray | None = None, title: str = "") -> None:
    """Write the grid for test image `index`; `clean` (H, W, C) uint8 adds a first 'clean' column."""
    if not names:
        raise ValueError("no corruptions to show")
    if not 0 <= index < cset.n:
        raise ValueError(f"index={index} outside the {cset.n} images per severity")
    cols = len(SEVERITIES) + (clean is not None)
    fig = Figure(figsize=(1.1 * cols + 1.6, 1.1 * len(names) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), cols, squeeze=False)
    for r, name in enumerate(names):
        row = [cset.load(name, s, n=index + 1)[0][index] for s in SEVERITIES]
        if clean is not None:
            row.insert(0, clean)
        for c, img in enumerate(row):
            ax = axes[r, c]
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("clean" if clean is not None and c == 0 else f"s{c + (clean is None)}", fontsize=9)
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()) if title else None)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
