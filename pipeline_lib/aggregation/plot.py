"""The accuracy-robustness plot ARREST draws: standard accuracy (x) against robust accuracy (y),
the references' Pareto frontier, every model's point with its 95 % error bars in both directions,
labelled with its ARDist, sweep curves.

The robust models usually sit in a small corner far from the standard model (robust ~0 %), so
when they would be squeezed together a second panel zooms on them; labels are placed by measuring
their rendered boxes so that none covers another label or a marker."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.patches import Rectangle
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot state, no display needed
from matplotlib.transforms import Bbox

from ..io import atomic_path
from .rows import ModelRow, Summary

_BEYOND = "#2ca02c"
# Candidate label offsets (points from the marker), tried in order: the four corners first.
_OFFSETS = [(8, 6), (8, -26), (-8, 6), (-8, -26), (8, 22), (-8, 22), (8, -42), (-8, -42),
            (22, -10), (-22, -10), (8, 38), (-8, 38), (8, -58), (-8, -58)]
_MARKER_PX = 7.0        # half-size of a marker's keep-out box, pixels
_ZOOM_AREA = 0.2        # zoom when the robust models fill less than this share of the full view

Limits = tuple[float, float, float, float]   # x_lo, x_hi, y_lo, y_hi


def _limits(xs: Sequence[float], ys: Sequence[float]) -> Limits:
    pad_x = max(2.0, 0.08 * (max(xs) - min(xs)))
    pad_y = max(2.0, 0.12 * (max(ys) - min(ys)))
    # Stay near [0, 100] but keep half a pad beyond it so points at 0 % or 100 % are drawn whole.
    return (max(-pad_x / 2, min(xs) - pad_x), min(100.0 + pad_x / 2, max(xs) + pad_x),
            max(-pad_y / 2, min(ys) - pad_y), min(100.0 + pad_y / 2, max(ys) + pad_y))


def _extent(rows: list[ModelRow]) -> tuple[list[float], list[float]]:
    """x and y values a view must hold: every point and the ends of its error bars (rows with a robust value)."""
    xs = [v for r in rows for v in (r.clean, *r.ci.get("clean", ()))]
    ys = [v for r in rows if r.robust is not None for v in (r.robust, *r.ci.get("robust", ()))]
    return xs, ys


def _xy(r: ModelRow) -> tuple[float, float]:
    """A plotted row's point (clean, robust); only rows with a robust accuracy are plotted."""
    assert r.robust is not None
    return r.clean, r.robust


def _zoom(rows: list[ModelRow], full: Limits) -> tuple[list[ModelRow], Limits] | None:
    """(the robust models, their view limits) when they crowd one corner of the full view, else None."""
    top = max(_xy(r)[1] for r in rows)
    robust = [r for r in rows if _xy(r)[1] >= 0.25 * top]
    if len(robust) < 2 or len(robust) == len(rows):
        return None
    lims = _limits(*_extent(robust))
    share = (lims[1] - lims[0]) * (lims[3] - lims[2]) / ((full[1] - full[0]) * (full[3] - full[2]))
    return (robust, lims) if share < _ZOOM_AREA else None


def _draw_curves(ax: Axes, s: Summary, lims: Limits,
                 color: dict[str, Any], legend: bool) -> None:
    x_lo, x_hi, y_lo, y_hi = lims
    if s.curve is not None:
        c = s.curve
        # The references' region: flat left of the frontier, its segments, a vertical drop at its right end.
        fx = np.array([min(x_lo, c.x_min), *c.xs, c.x_max])
        fy = np.array([c.ys[0], *c.ys, min(y_lo, c.ys[-1])])
        beyond = np.array([*zip(fx, fy), (x_hi, y_lo), (x_hi, y_hi), (fx[0], y_hi)])   # (V, 2) polygon
        ax.fill(beyond[:, 0], beyond[:, 1], color=_BEYOND, alpha=0.07, lw=0,
                label="beyond the references' tradeoff (ARDist > 0)" if legend else None)
        ax.plot(c.xs, c.ys, color="black", lw=1.8,
                label=f"reference tradeoff: Pareto frontier ({len(c.xs)} of {c.n_points} references)"
                if legend else None)
        ax.plot(fx[:2], fy[:2], color="black", lw=1.0, ls=":")      # flat extension left of the frontier
        ax.plot(fx[-2:], fy[-2:], color="black", lw=1.0, ls=":")    # vertical drop right of it
    if s.reference_mode == "published" and s.reference_points:
        ax.scatter([p.standard for p in s.reference_points], [p.robust for p in s.reference_points],
                   marker="s", s=28, color="0.55", zorder=3, label="published reference points" if legend else None)
    for sw in s.sweeps:
        if sw.curve is None:
            continue
        g = np.linspace(sw.curve.x_min, sw.curve.x_max, 100)
        gap = "" if sw.mean_gap is None else f", mean gap {sw.mean_gap:+.2f}"
        ax.plot(g, sw.curve(g), ls="--", lw=1.4, color=color.get(sw.objective, "0.3"),
                label=f"{sw.objective} sweep ({len(sw.models)} points{gap})" if legend else None)


def _draw_points(ax: Axes, rows: list[ModelRow], color: dict[str, Any], legend: bool) -> None:
    for r in rows:
        ref = r.role == "reference"
        ci = r.ci
        x, y = _xy(r)
        if "clean" in ci or "robust" in ci:   # 95 % intervals in both directions (Wilson: may be asymmetric)
            xerr = [[x - ci["clean"][0]], [ci["clean"][1] - x]] if "clean" in ci else None
            yerr = [[y - ci["robust"][0]], [ci["robust"][1] - y]] if "robust" in ci else None
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="none", ecolor=color[r.objective],
                        elinewidth=1.0, capsize=2.5, alpha=0.8, zorder=3)
        ax.scatter([x], [y], s=70, marker="s" if ref else "o", color=color[r.objective],
                   edgecolor="black", linewidth=0.8, zorder=4,
                   label=f"{r.model}{' (reference)' if ref else ''}" if legend else None)


def _annotate(ax: Axes, rows: list[ModelRow]) -> list[Any]:
    out = []
    for r in rows:
        dist = r.ardist
        text = r.model if dist is None or math.isnan(dist) else f"{r.model}\nARDist {dist:+.2f}"
        ann = ax.annotate(text, _xy(r), xytext=_OFFSETS[0], textcoords="offset points",
                          fontsize=8.5, zorder=5, annotation_clip=False,
                          bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.8", "alpha": 0.9})
        ann.set_in_layout(False)   # placement happens after layout; keep the layout from moving
        out.append(ann)
    return out


def _place_labels(fig: Figure, ax: Axes, anns: list[Any], points: list[tuple[float, float]]) -> None:
    """Greedy placement: each label takes the first candidate offset whose rendered box stays inside
    the axes and overlaps no placed label and no marker; failing that, the least overlapping one."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    markers = [Bbox.from_bounds(px - _MARKER_PX, py - _MARKER_PX, 2 * _MARKER_PX, 2 * _MARKER_PX)
               for px, py in ax.transData.transform(np.asarray(points, dtype=float).reshape(-1, 2))]
    placed: list[Bbox] = []

    def overlap(a: Bbox, b: Bbox) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return max(w, 0.0) * max(h, 0.0)

    for ann in anns:
        best: tuple[float, tuple[int, int]] | None = None
        for dx, dy in _OFFSETS:
            ann.xyann = (dx, dy)
            ann.set_horizontalalignment("left" if dx >= 0 else "right")
            box = ann.get_window_extent(renderer)
            outside = box.width * box.height - overlap(box, frame)
            cost = sum(overlap(box, o) for o in placed + markers) + outside
            if best is None or cost < best[0]:
                best = (cost, (dx, dy))
            if cost == 0:
                break
        assert best is not None
        ann.xyann = best[1]
        ann.set_horizontalalignment("left" if best[1][0] >= 0 else "right")
        placed.append(ann.get_window_extent(renderer))


def _finish(ax: Axes, lims: Limits, robust_label: str, title: str) -> None:
    ax.set_xlim(lims[0], lims[1])
    ax.set_ylim(lims[2], lims[3])
    ax.set_xlabel("standard (clean) accuracy (%)")
    ax.set_ylabel(f"robust accuracy (%): {robust_label}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def draw_tradeoff(s: Summary) -> Figure:
    rows = [r for r in s.rows if r.robust is not None]
    xs, ys = _extent(rows)
    xs += [p.standard for p in s.reference_points]
    ys += [p.robust for p in s.reference_points]
    if not xs:   # nothing to place: say so on the figure instead of failing the stage
        fig = Figure(figsize=(9, 6.5), dpi=130)
        fig.subplots().text(0.5, 0.5, "no model has a robust accuracy to plot", ha="center", va="center")
        return fig
    full = _limits(xs, ys)
    zoom = _zoom(rows, full) if rows else None
    fig = Figure(figsize=(15.5, 6.5) if zoom else (9.5, 6.5), dpi=130, layout="constrained")
    FigureCanvasAgg(fig)   # a renderer to measure labels with
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]

    cmap = matplotlib.colormaps["tab10"]
    objectives = list(dict.fromkeys(r.objective for r in rows))
    color = {o: cmap(i % 10) for i, o in enumerate(objectives)}
    ctx = s.context
    fig.suptitle(f"Accuracy-robustness tradeoff: {ctx.get('dataset')} / {ctx.get('arch')}, "
                 f"L-inf eps {ctx.get('eps')}", fontsize=11)

    panels: list[tuple[Axes, list[ModelRow]]] = []   # (axes, the models labelled on it)
    zoomed = {id(r) for r in zoom[0]} if zoom else set()
    # Full view: every model; when zooming, only the models outside the zoom are labelled here.
    _draw_curves(axes[0], s, full, color, legend=True)
    _draw_points(axes[0], rows, color, legend=True)
    _finish(axes[0], full, s.robust_label(), "all models" if zoom else "")
    panels.append((axes[0], [r for r in rows if id(r) not in zoomed]))
    if zoom:
        zoom_rows, zl = zoom
        axes[0].add_patch(Rectangle((zl[0], zl[2]), zl[1] - zl[0], zl[3] - zl[2],
                                                       fill=False, ls="--", lw=1.0, ec="0.4", zorder=2))
        _draw_curves(axes[1], s, zl, color, legend=False)
        _draw_points(axes[1], zoom_rows, color, legend=False)
        _finish(axes[1], zl, s.robust_label(), "robust models (dashed box on the left, zoomed)")
        panels.append((axes[1], zoom_rows))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8, frameon=False)

    fig.draw_without_rendering()   # fix the layout before measuring labels against it
    for ax, labelled in panels:
        anns = _annotate(ax, labelled)
        _place_labels(fig, ax, anns, [_xy(r) for r in rows])
    return fig


def write_tradeoff_plot(s: Summary, path: Path) -> None:
    fig = draw_tradeoff(s)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
