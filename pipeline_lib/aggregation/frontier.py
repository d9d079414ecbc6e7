"""The reference tradeoff ARDist measures against: the upper Pareto frontier of the reference points.

Definition (points are (standard, robust) accuracies in percentage points):

- **Frontier**: the reference points no other reference matches or beats on both axes
  (a Pareto-dominated reference says nothing about what is achievable). Sorted by
  standard accuracy, their robust accuracy falls.
- **Between frontier points: straight lines.** Mixing two models at random (answer with A
  with probability t, else B) achieves exactly the straight line between their
  (standard, robust) points in expectation, so the segment is an achievable tradeoff;
  any curve above it would claim more than the references show.
- **Outside the frontier's standard-accuracy range [x_0, x_k]**: left of x_0 the curve stays
  flat at the most robust reference's robust accuracy (a model with less clean accuracy and
  no more robustness is dominated by that reference); right of x_k (more clean accuracy than
  every reference) the boundary drops vertically: nothing there is dominated, so such a
  model lies beyond the references' tradeoff whatever its robustness.

The references' region D = {(x, y): x <= x_k and y <= g(x)}; ARDist is the signed Euclidean
distance from a model's point to D's boundary, positive outside D (beyond the tradeoff),
negative inside. Every reference lies in D: a frontier reference scores exactly 0, a
dominated one <= 0 (0 only when it sits on the flat left extension). This replaces a
least-squares line, which need not pass through its references (the standard model at ~0 %
robust accuracy pinned it, so references scored up to +-4 points and ARDist mostly rewarded
clean accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .curve import CurveFitError

_FAR = 1000.0   # points: the boundary's flat-left and vertical-right rays, as long finite segments


def pareto_frontier(standard: Sequence[float], robust: Sequence[float]) -> list[tuple[float, float]]:
    """The non-dominated (standard, robust) points, by rising standard accuracy (robust then falls strictly)."""
    pts = sorted(zip(map(float, standard), map(float, robust), strict=True), key=lambda p: (-p[0], -p[1]))
    front: list[tuple[float, float]] = []
    for x, y in pts:   # by falling x: keep a point only if it is more robust than every point right of it
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front[::-1]


@dataclass(frozen=True)
class FrontierCurve:
    xs: tuple[float, ...]        # frontier vertices, rising standard accuracy
    ys: tuple[float, ...]        # their robust accuracy, falling
    n_points: int                # reference points given (the frontier may use fewer)
    family: str = "Pareto frontier"

    @property
    def x_min(self) -> float:
        return self.xs[0]

    @property
    def x_max(self) -> float:
        return self.xs[-1]

    def __call__(self, x: ArrayLike) -> NDArray[np.float64]:
        """g(x): flat left of the frontier, linear between its points, NaN right of it (no curve there)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.interp(x, self.xs, self.ys, left=self.ys[0], right=np.nan)
        return np.where(x > self.x_max, np.nan, y)

    def outline(self) -> NDArray[np.float64]:
        """(V, 2) the boundary of the references' region: flat ray, frontier, vertical ray."""
        return np.array([(self.xs[0] - _FAR, self.ys[0]), *zip(self.xs, self.ys, strict=True),
                         (self.xs[-1], self.ys[-1] - _FAR)])

    def inside(self, standard: float, robust: float) -> bool:
        return standard <= self.x_max and robust <= float(self(min(standard, self.x_max)))

    def signed_distance(self, standard: float, robust: float) -> float:
        """ARDist: Euclidean distance (points) to the boundary, positive beyond it, 0 on it."""
        if not (math.isfinite(standard) and math.isfinite(robust)):
            raise ValueError(f"ARDist needs a finite point, got ({standard!r}, {robust!r})")
        v = self.outline()
        a, ab = v[:-1], v[1:] - v[:-1]                       # (V-1, 2) segment starts and directions
        p = np.array([standard, robust])
        t = np.clip(((p - a) * ab).sum(1) / (ab * ab).sum(1), 0.0, 1.0)
        dist = float(np.sqrt(((a + t[:, None] * ab - p) ** 2).sum(1)).min())
        if dist <= 1e-9:
            return 0.0
        return -dist if self.inside(standard, robust) else dist

    def describe(self) -> str:
        pts = ", ".join(f"({x:.2f}, {y:.2f})" for x, y in zip(self.xs, self.ys, strict=True))
        return (f"upper Pareto frontier of {self.n_points} reference points, piecewise linear through {pts}; "
                f"flat left of it, vertical right of it")


def fit_frontier(standard: Sequence[float], robust: Sequence[float]) -> FrontierCurve:
    """The frontier curve of the reference points; CurveFitError without a finite point."""
    x, y = np.asarray(standard, dtype=np.float64), np.asarray(robust, dtype=np.float64)
    if x.size == 0:
        raise CurveFitError("a reference frontier needs at least one reference point; got none")
    if x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise CurveFitError(f"reference points must be finite (standard, robust) pairs; got {list(zip(x, y))}")
    front = pareto_frontier(x.tolist(), y.tolist())
    return FrontierCurve(tuple(p[0] for p in front), tuple(p[1] for p in front), int(x.size))
