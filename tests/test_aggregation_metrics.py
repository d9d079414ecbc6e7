"""NRR, the tradeoff-curve fit, ARDist and the sweep mean gap against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline_lib.aggregation import CurveFitError, fit_tradeoff_curve, mean_gap, nrr, signed_distance

# Reference line through (90, 0) and (80, 40): robust = -4 * standard + 360.
# Its unit normal is (4, 1) / sqrt(17), so a point 1 point above it lies 1 / sqrt(17) away.
REF_X, REF_Y = [90.0, 80.0], [0.0, 40.0]


@pytest.fixture
def ref_line():
    return fit_tradeoff_curve(REF_X, REF_Y)


def test_nrr_hand_values() -> None:
    assert nrr(80.0, 40.0) == pytest.approx(2 * 80 * 40 / 120)   # 53.33
    assert nrr(50.0, 50.0) == pytest.approx(50.0)                # equal inputs: their value
    assert nrr(90.0, 0.0) == 0.0                                  # no robustness, no NRR
    assert nrr(0.0, 0.0) == 0.0
    assert nrr(80.0, 40.0) < (80.0 + 40.0) / 2                    # harmonic mean < arithmetic mean


@pytest.mark.parametrize("bad", [(-1.0, 50.0), (50.0, float("nan")), (float("inf"), 1.0)])
def test_nrr_rejects_bad_accuracy(bad: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="NRR needs"):
        nrr(*bad)


def test_two_points_give_the_line_through_them(ref_line) -> None:
    assert ref_line.family == "linear"
    assert ref_line.coeffs == pytest.approx((-4.0, 360.0))
    assert ref_line([80.0, 85.0, 90.0]) == pytest.approx([40.0, 20.0, 0.0])


def test_ardist_on_above_below(ref_line) -> None:
    assert signed_distance(ref_line, 85.0, 20.0) == 0.0                       # on the curve
    assert signed_distance(ref_line, 90.0, 0.0) == 0.0                        # a reference point itself
    assert signed_distance(ref_line, 85.0, 21.0) == pytest.approx(1 / math.sqrt(17), abs=1e-6)
    assert signed_distance(ref_line, 85.0, 19.0) == pytest.approx(-1 / math.sqrt(17), abs=1e-6)
    # (85, 25): 5 points above -> 5 / sqrt(17) = 1.2127 beyond the tradeoff.
    assert signed_distance(ref_line, 85.0, 25.0) == pytest.approx(5 / math.sqrt(17), abs=1e-6)


def test_ardist_is_euclidean_not_vertical() -> None:
    # A flat reference robust = 40 between x = 70 and 90: distance = vertical gap; a steep one: much less.
    flat = fit_tradeoff_curve([70.0, 90.0], [40.0, 40.0])
    assert signed_distance(flat, 80.0, 43.0) == pytest.approx(3.0, abs=1e-6)
    steep = fit_tradeoff_curve([80.0, 81.0], [40.0, 0.0])       # slope -40
    d = signed_distance(steep, 80.5, 30.0)                          # 10 points above
    assert d == pytest.approx(10 / math.sqrt(1 + 40 ** 2), abs=1e-6)


def test_quadratic_fit_and_tangent_extrapolation() -> None:
    # robust = 100 - standard^2 / 100 at standard = 60, 80, 90 (decreasing there).
    curve = fit_tradeoff_curve([60.0, 80.0, 90.0], [64.0, 36.0, 19.0])
    assert curve.family == "quadratic"
    assert curve.coeffs == pytest.approx((-0.01, 0.0, 100.0), abs=1e-9)
    assert signed_distance(curve, 70.0, 51.0) == pytest.approx(0.0, abs=1e-6)
    # Beyond the fitted range the curve is the tangent at x = 90 (slope -1.8), not the parabola.
    assert float(curve(95.0)) == pytest.approx(19.0 - 1.8 * 5)
    assert float(curve(50.0)) == pytest.approx(64.0 + 1.2 * 10)  # tangent at 60 has slope -1.2


def test_auto_falls_back_to_a_line_when_the_quadratic_is_not_a_tradeoff() -> None:
    # A valley: the interpolating quadratic rises again between the points, so auto uses least squares.
    curve = fit_tradeoff_curve([80.0, 85.0, 90.0], [40.0, 10.0, 20.0])
    assert curve.family == "linear"
    slope, intercept = np.polyfit([80.0, 85.0, 90.0], [40.0, 10.0, 20.0], 1)
    assert curve.coeffs == pytest.approx((slope, intercept))
    forced = fit_tradeoff_curve([80.0, 85.0, 90.0], [40.0, 10.0, 20.0], "quadratic")
    assert forced.family == "quadratic"


@pytest.mark.parametrize("xs, ys, family, match", [
    ([85.0], [20.0], "auto", "at least 2 points"),
    ([], [], "auto", "at least 2 points"),
    ([85.0, 85.0], [20.0, 30.0], "auto", "distinct standard accuracy"),
    ([80.0, 90.0], [40.0, 0.0], "quadratic", "at least 3 points"),
    ([80.0, 90.0], [40.0, float("nan")], "auto", "non-finite"),
    ([80.0, 90.0], [40.0], "auto", "differ in length"),
])
def test_curve_fit_errors(xs, ys, family, match) -> None:
    with pytest.raises(CurveFitError, match=match):
        fit_tradeoff_curve(xs, ys, family)


def test_sweep_entirely_above_has_positive_mean_gap(ref_line) -> None:
    # Sweep robust = -4 x + 364 on [82, 88]: 4 points above the reference everywhere.
    sweep = fit_tradeoff_curve([82.0, 88.0], [36.0, 12.0])
    assert mean_gap(sweep, ref_line) == pytest.approx(4.0, abs=1e-9)


def test_mean_gap_averages_a_varying_gap(ref_line) -> None:
    # Sweep robust = -4.4 x + 396 on [80, 90]: gap 4 at x = 80 shrinking linearly to 0 at 90 -> mean 2.
    sweep = fit_tradeoff_curve([80.0, 90.0], [44.0, 0.0])
    assert mean_gap(sweep, ref_line) == pytest.approx(2.0, abs=1e-9)


def test_sweep_below_is_negative_and_disjoint_is_none(ref_line) -> None:
    below = fit_tradeoff_curve([82.0, 88.0], [30.0, 6.0])       # 2 points under the reference
    assert mean_gap(below, ref_line) == pytest.approx(-2.0, abs=1e-9)
    beyond_range = fit_tradeoff_curve([92.0, 95.0], [5.0, 1.0])  # no common standard-accuracy range
    assert mean_gap(beyond_range, ref_line) is None
