"""ARDist and the Bjontegaard-style mean gap: how far a method lies beyond a tradeoff curve.

Project definition (REFERENCE §2; the ARREST paper's exact procedure was not available):

- ARDist of a method = signed Euclidean distance, in percentage points, from its
  (standard, robust) point to the reference curve g. Positive above the curve
  (for a decreasing curve: up/right, beyond the tradeoff), negative below, 0 on it.
  The run's reference curve is the references' upper Pareto frontier (frontier.py, which
  says why); `signed_distance` below measures against a fitted curve (sweeps, tests).
- ARDist's 95 % interval: percentile bootstrap over test examples, every model resampled
  with the same indices and the frontier rebuilt from the resampled references.
- Mean gap of a sweep (one objective at several knob values) = mean vertical gap
  (1 / (b - a)) * integral_a^b (g_sweep(x) - g_ref(x)) dx over the overlap [a, b] of
  both curves' standard-accuracy ranges, as BD-rate averages the gap between two
  rate-distortion curves over their common range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray
from scipy.integrate import trapezoid

from ..stats import LEVEL, percentile_interval
from .curve import TradeoffCurve
from .frontier import FrontierCurve, fit_frontier

# Grid resolution for the numerical distance / integral. The polyline is within
# (spacing^2 * max|g''| / 8) of the curve: < 1e-6 points for any sane quadratic.
_GRID = 20_001
# A reference point's own gap is float round-off (~1e-14) of either sign: report it as exactly 0.
_ON_CURVE = 1e-9


def signed_distance(curve: TradeoffCurve | FrontierCurve, standard: float, robust: float) -> float:
    """ARDist: signed Euclidean distance (points) from (standard, robust) to the curve."""
    if isinstance(curve, FrontierCurve):
        return curve.signed_distance(standard, robust)
    if not (math.isfinite(standard) and math.isfinite(robust)):
        raise ValueError(f"ARDist needs a finite point, got ({standard!r}, {robust!r})")
    vertical = robust - float(curve(standard))
    if abs(vertical) <= _ON_CURVE:
        return 0.0
    # The nearest curve point is no farther than the vertical gap, so its standard
    # accuracy lies within |vertical| of the method's: search that window only.
    reach = abs(vertical)
    xs = np.linspace(standard - reach, standard + reach, _GRID)
    pts = np.stack([xs, curve(xs)], axis=1)                 # (G, 2) polyline vertices
    a, b = pts[:-1], pts[1:]                                # (G-1, 2) segment ends
    ab = b - a
    p = np.array([standard, robust])
    t = np.clip(((p - a) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-300), 0.0, 1.0)
    dist = np.sqrt(((a + t[:, None] * ab - p) ** 2).sum(1)).min()
    return float(math.copysign(min(dist, reach), vertical))


def mean_gap(sweep: TradeoffCurve, reference: TradeoffCurve | FrontierCurve) -> float | None:
    """Mean vertical gap (points) of the sweep's curve over the reference curve on their common
    standard-accuracy range; positive = the sweep lies above. None when the ranges do not overlap."""
    lo, hi = max(sweep.x_min, reference.x_min), min(sweep.x_max, reference.x_max)
    if not hi > lo:
        return None
    xs = np.linspace(lo, hi, _GRID)
    return float(trapezoid(sweep(xs) - reference(xs), xs) / (hi - lo))


def ardist_bootstrap(correct: Mapping[str, tuple[NDArray[np.bool_], NDArray[np.bool_]]],
                     references: Sequence[str] | None, fixed: FrontierCurve | None,
                     idx: NDArray[np.int64], level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """Percentile interval of every model's ARDist over bootstrap resamples of the test examples.

    correct[model] = ((N,) right on the clean image, (N,) right under the robust metric). Every model is
    resampled with the same example indices idx (B, N), and with own references (`references`, names in
    `correct`) the frontier is rebuilt from the resampled reference points each time, so the interval
    carries the references' noise too; with published references (`fixed`) only the model moves."""
    names = list(correct)
    clean = np.stack([correct[m][0] for m in names]).astype(np.float64)    # (M, N)
    robust = np.stack([correct[m][1] for m in names]).astype(np.float64)   # (M, N)
    cx = 100.0 * clean[:, idx].mean(-1)                                    # (M, B) resampled clean accuracy
    ry = 100.0 * robust[:, idx].mean(-1)                                   # (M, B)
    ref_rows = [names.index(r) for r in references] if references is not None else []
    samples = np.empty_like(cx)
    for b in range(idx.shape[0]):
        curve = fixed if fixed is not None else fit_frontier(cx[ref_rows, b].tolist(), ry[ref_rows, b].tolist())
        samples[:, b] = [curve.signed_distance(float(cx[i, b]), float(ry[i, b])) for i in range(len(names))]
    return {m: percentile_interval(samples[i], level) for i, m in enumerate(names)}
