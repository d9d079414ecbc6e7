"""Fitting the accuracy-robustness tradeoff curve robust = g(standard) through points.

The project's choice (the ARREST paper's exact procedure was not available):

- 2 points with distinct standard accuracy: the line through them;
- 3+ points: the least-squares quadratic if it is non-increasing over the points'
  standard-accuracy range (a tradeoff: more clean accuracy never buys robustness),
  else the least-squares line (`curve: auto`). `linear` / `quadratic` force a family;
- outside the fitted range the curve continues as its tangent at the nearest end, so
  extrapolating neither bends a quadratic back nor lets it run off (C1-continuous).

Points are (standard, robust) in percentage points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray


class CurveFitError(ValueError):
    """Too few or invalid points to fit a tradeoff curve."""


@dataclass(frozen=True)
class TradeoffCurve:
    coeffs: tuple[float, ...]   # numpy.polyfit order: highest power first
    x_min: float                # standard-accuracy range of the fitted points
    x_max: float
    family: Literal["linear", "quadratic"]
    n_points: int

    def _poly(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.polyval(self.coeffs, x)

    def _slope(self, x: float) -> float:
        return float(np.polyval(np.polyder(self.coeffs), x))

    def __call__(self, x: ArrayLike) -> NDArray[np.float64]:
        """g(x) for standard accuracies x (any shape): the polynomial inside [x_min, x_max], tangents outside."""
        x = np.asarray(x, dtype=np.float64)
        lo, hi = self.x_min, self.x_max
        y = self._poly(np.clip(x, lo, hi))
        y = np.where(x < lo, float(self._poly(np.float64(lo))) + self._slope(lo) * (x - lo), y)
        return np.where(x > hi, float(self._poly(np.float64(hi))) + self._slope(hi) * (x - hi), y)

    def is_non_increasing(self) -> bool:
        # g' is constant (line) or linear (quadratic): checking both ends covers the range.
        return self._slope(self.x_min) <= 1e-12 and self._slope(self.x_max) <= 1e-12

    def describe(self) -> str:
        names = ["x^2", "x", ""][-len(self.coeffs):]
        terms = f"{self.coeffs[0]:.4g} {names[0]}"
        for c, n in zip(self.coeffs[1:], names[1:], strict=True):
            terms += f" {'-' if c < 0 else '+'} {abs(c):.4g}{' ' + n if n else ''}"
        return (f"{self.family} through {self.n_points} points on [{self.x_min:.2f}, {self.x_max:.2f}]: "
                f"robust = {terms}")


def _validate(standard: ArrayLike, robust: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    x = np.asarray(standard, dtype=np.float64).ravel()
    y = np.asarray(robust, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise CurveFitError(f"standard and robust accuracies differ in length: {x.size} vs {y.size}")
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if bad.any():
        raise CurveFitError(f"non-finite point(s) {list(zip(x[bad].tolist(), y[bad].tolist(), strict=True))}")
    return x, y


def fit_tradeoff_curve(standard: ArrayLike, robust: ArrayLike,
                       family: Literal["auto", "linear", "quadratic"] = "auto") -> TradeoffCurve:
    """Fit robust = g(standard) through (standard[i], robust[i]); see the module docstring for the family rule."""
    x, y = _validate(standard, robust)
    n_distinct = np.unique(x).size
    if n_distinct < 2:
        raise CurveFitError(f"a tradeoff curve needs at least 2 points with distinct standard accuracy; got "
                            f"{x.size} point(s) {list(zip(x.tolist(), y.tolist(), strict=True))}")
    if family == "quadratic" and n_distinct < 3:
        raise CurveFitError(f"a quadratic tradeoff curve needs at least 3 points with distinct standard "
                            f"accuracy; got {n_distinct}")
    if family not in ("auto", "linear", "quadratic"):
        raise CurveFitError(f"unknown curve family {family!r}; use auto, linear or quadratic")

    def make(deg: int) -> TradeoffCurve:
        coeffs = np.polyfit(x, y, deg)
        return TradeoffCurve(tuple(float(c) for c in coeffs), float(x.min()), float(x.max()),
                             "quadratic" if deg == 2 else "linear", int(x.size))

    if family == "quadratic" or (family == "auto" and n_distinct >= 3):
        curve = make(2)
        if family == "quadratic" or curve.is_non_increasing():
            return curve
    return make(1)   # may rise: callers check is_non_increasing() and say so where it matters
