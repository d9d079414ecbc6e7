"""ARDist and the Bjontegaard-style mean gap: how far a method lies beyond a tradeoff curve.

Project definition (REFERENCE §2; the ARREST paper's exact procedure was not available):

- ARDist of a method = signed Euclidean distance, in percentage points, from its
  (standard, robust) point to the reference curve g. Positive above the curve
  (for a decreasing curve: up/right, beyond the tradeoff), negative below, 0 on it.
- Mean gap of a sweep (one objective at several knob values) = mean vertical gap
  (1 / (b - a)) * integral_a^b (g_sweep(x) - g_ref(x)) dx over the overlap [a, b] of
  both curves' standard-accuracy ranges, as BD-rate averages the gap between two
  rate-distortion curves over their common range.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.integrate import trapezoid

from .curve import TradeoffCurve

# Grid resolution for the numerical distance / integral. The polyline is within
# (spacing^2 * max|g''| / 8) of the curve: < 1e-6 points for any sane quadratic.
_GRID = 20_001
# A reference point's own gap is float round-off (~1e-14) of either sign: report it as exactly 0.
_ON_CURVE = 1e-9


def signed_distance(curve: TradeoffCurve, standard: float, robust: float) -> float:
    """ARDist: signed Euclidean distance (points) from (standard, robust) to the curve."""
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


def mean_gap(sweep: TradeoffCurve, reference: TradeoffCurve) -> float | None:
    """Mean vertical gap (points) of the sweep's curve over the reference curve on their common
    standard-accuracy range; positive = the sweep lies above. None when the ranges do not overlap."""
    lo, hi = max(sweep.x_min, reference.x_min), min(sweep.x_max, reference.x_max)
    if not hi > lo:
        return None
    xs = np.linspace(lo, hi, _GRID)
    return float(trapezoid(sweep(xs) - reference(xs), xs) / (hi - lo))
