"""The accuracy-robustness plot ARREST draws: standard accuracy (x) against robust accuracy (y),
the fitted reference tradeoff curve, every model's point labelled with its ARDist, sweep curves."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot state, no display needed

from ..io import atomic_path
from .summary import Summary

_BEYOND = "#2ca02c"


def _label_offsets(points: list[tuple[float, float]], span: tuple[float, float]) -> list[tuple[int, int]]:
    """Text offsets (pixels) so labels of points close to an earlier point go to another corner."""
    corners = [(8, 6), (8, -26), (-8, 6), (-8, -26)]
    out: list[tuple[int, int]] = []
    for i, (x, y) in enumerate(points):
        close = sum(1 for (px, py) in points[:i]
                    if abs(px - x) < 0.08 * span[0] and abs(py - y) < 0.08 * span[1])
        out.append(corners[close % len(corners)])
    return out


def draw_tradeoff(s: Summary) -> Figure:
    fig = Figure(figsize=(9, 6.5), dpi=130, layout="constrained")
    ax = fig.subplots()
    rows = [r for r in s.rows if r["robust"] is not None]
    xs = [r["clean"] for r in rows] + [p.standard for p in s.reference_points]
    ys = [r["robust"] for r in rows] + [p.robust for p in s.reference_points]
    if not xs:   # nothing to place: say so on the figure instead of failing the stage
        ax.text(0.5, 0.5, "no model has a robust accuracy to plot", ha="center", va="center", transform=ax.transAxes)
        return fig
    pad_x = max(3.0, 0.08 * (max(xs) - min(xs)))
    pad_y = max(3.0, 0.12 * (max(ys) - min(ys)))
    # Stay near [0, 100] but keep half a pad beyond it so points at 0 % or 100 % are drawn whole.
    x_lo, x_hi = max(-pad_x / 2, min(xs) - pad_x), min(100.0 + pad_x / 2, max(xs) + pad_x)
    y_lo, y_hi = max(-pad_y / 2, min(ys) - pad_y), min(100.0 + pad_y / 2, max(ys) + pad_y)

    if s.curve is not None:
        c = s.curve
        grid = np.linspace(x_lo, x_hi, 400)
        ax.fill_between(grid, c(grid), y_hi, color=_BEYOND, alpha=0.07, lw=0,
                        label="beyond the reference tradeoff (ARDist > 0)")
        inside = (grid >= c.x_min) & (grid <= c.x_max)
        ax.plot(grid[inside], c(grid[inside]), color="black", lw=1.8,
                label=f"reference tradeoff curve ({c.family}, {c.n_points} points)")
        for part in (grid <= c.x_min, grid >= c.x_max):
            if part.sum() > 1:
                ax.plot(grid[part], c(grid[part]), color="black", lw=1.0, ls=":")
    if s.reference_mode == "published" and s.reference_points:
        ax.scatter([p.standard for p in s.reference_points], [p.robust for p in s.reference_points],
                   marker="s", s=28, color="0.55", zorder=3, label="published reference points")

    cmap = matplotlib.colormaps["tab10"]
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    color = {o: cmap(i % 10) for i, o in enumerate(objectives)}
    span = (x_hi - x_lo, y_hi - y_lo)
    offsets = _label_offsets([(r["clean"], r["robust"]) for r in rows], span)
    for r, (dx, dy) in zip(rows, offsets, strict=True):
        ref = r["role"] == "reference"
        ax.scatter([r["clean"]], [r["robust"]], s=70, marker="s" if ref else "o", color=color[r["objective"]],
                   edgecolor="black", linewidth=0.8, zorder=4,
                   label=f"{r['model']}{' (reference)' if ref else ''}")
        dist = r["ardist"]
        text = r["model"] if dist is None or math.isnan(dist) else f"{r['model']}\nARDist {dist:+.2f}"
        ax.annotate(text, (r["clean"], r["robust"]), xytext=(dx, dy), textcoords="offset points",
                    ha="left" if dx > 0 else "right", fontsize=8.5, zorder=5,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.8", "alpha": 0.85})

    for sw in s.sweeps:
        if sw.curve is None:
            continue
        g = np.linspace(sw.curve.x_min, sw.curve.x_max, 100)
        gap = "" if sw.mean_gap is None else f", mean gap {sw.mean_gap:+.2f}"
        ax.plot(g, sw.curve(g), ls="--", lw=1.4, color=color.get(sw.objective, "0.3"),
                label=f"{sw.objective} sweep ({len(sw.models)} points{gap})")

    ctx = s.context
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel("standard (clean) accuracy (%)")
    ax.set_ylabel(f"robust accuracy (%): {s.robust_label()}")
    ax.set_title(f"Accuracy-robustness tradeoff: {ctx.get('dataset')} / {ctx.get('arch')}, L-inf eps {ctx.get('eps')}",
                 fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return fig


def write_tradeoff_plot(s: Summary, path: Path) -> None:
    fig = draw_tradeoff(s)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
