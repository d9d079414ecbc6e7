"""The tradeoff plot: a zoom panel when the robust models crowd a corner, and labels that cover
neither each other nor a marker, measured on the rendered figure."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest

from pipeline_lib.aggregation.plot import draw_tradeoff, write_tradeoff_plot
from pipeline_lib.aggregation.columns import numeric_columns
from pipeline_lib.aggregation.rows import ModelRow, Summary


def _summary(points: dict[str, tuple[float, float]]) -> Summary:
    rows = [ModelRow(m, m, "autoattack", {**dict.fromkeys(numeric_columns()), "clean": c, "robust": r, "ardist": 0.5 * i},
                     role="reference" if m == "standard" else "method") for i, (m, (c, r)) in enumerate(points.items())]
    return Summary(rows=rows, robust_metric="autoattack", reference_mode="own", reference_points=[],
                   curve=None, curve_error=None, sweeps=[], context={"dataset": "d", "arch": "a", "eps": 0.1})


# A default-run-like layout: standard far away, six robust models within a few points of each other.
CROWDED = {"standard": (87.0, 0.0), "pgd_at": (78.0, 54.4), "trades": (74.0, 51.0), "mart": (72.2, 51.4),
           "arrest": (81.4, 55.0), "arat": (78.4, 54.0), "cure": (77.4, 49.6), "twin": (74.2, 51.1)}


def _label_boxes(fig):  # type: ignore[no-untyped-def]
    renderer = fig.canvas.get_renderer()
    return {ax: [t.get_window_extent(renderer) for t in ax.texts] for ax in fig.axes}


def test_crowded_robust_models_get_a_zoom_panel_with_their_labels() -> None:
    fig = draw_tradeoff(_summary(CROWDED))
    full, zoom = fig.axes
    assert [t.get_text().split("\n")[0] for t in full.texts] == ["standard"]
    assert sorted(t.get_text().split("\n")[0] for t in zoom.texts) == sorted(set(CROWDED) - {"standard"})
    assert zoom.get_ylim()[0] > 40 and zoom.get_xlim()[1] < 87


def test_spread_models_need_no_zoom() -> None:
    fig = draw_tradeoff(_summary({"a": (90.0, 10.0), "b": (70.0, 50.0), "c": (50.0, 80.0)}))
    assert len(fig.axes) == 1 and len(fig.axes[0].texts) == 3


@pytest.mark.parametrize("points", [CROWDED, {"a": (80.0, 50.0), "b": (80.3, 50.2), "c": (80.1, 49.9)}],
                         ids=["default-like", "three-on-top"])
def test_labels_overlap_no_other_label_and_no_marker(points: dict[str, tuple[float, float]]) -> None:
    fig = draw_tradeoff(_summary(points))
    for ax, boxes in _label_boxes(fig).items():
        for a, b in combinations(boxes, 2):
            assert not a.overlaps(b), (a, b)
        xy = ax.transData.transform([p for p in points.values()])
        lo, hi = ax.get_xlim(), ax.get_ylim()
        shown = [(px, py) for (px, py), (c, r) in zip(xy, points.values(), strict=True)
                 if lo[0] <= c <= lo[1] and hi[0] <= r <= hi[1]]
        for box in boxes:
            assert not any(box.x0 < px < box.x1 and box.y0 < py < box.y1 for px, py in shown)


def test_writes_a_png(tmp_path: Path) -> None:
    write_tradeoff_plot(_summary(CROWDED), tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))
