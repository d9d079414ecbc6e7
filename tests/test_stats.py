"""Interval, McNemar, paired bootstrap and Holm code against scipy and values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline_lib.stats import (bootstrap_mean_interval, holm, interval_block, mcnemar_exact, paired_comparison,
                                wilson_interval)


def test_wilson_hand_value() -> None:
    # 5 of 10: centre (0.5 + z^2/20) / (1 + z^2/10) = 0.5; half z sqrt(0.025 + z^2/400) / (1 + z^2/10) = 0.263402
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)   # hand arithmetic to 4 places
    # 0 of 10: lower bound exactly 0, upper z^2 / (n + z^2) = 3.841459 / 13.841459
    assert wilson_interval(0, 10) == pytest.approx((0.0, 3.841459 / 13.841459), abs=1e-6)
    assert wilson_interval(10, 10)[1] == 1.0


@pytest.mark.parametrize("k, n", [(1, 7), (18, 100), (55, 100), (275, 500), (499, 500), (0, 500)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


@pytest.mark.parametrize("k, n", [(-1, 10), (11, 10), (0, 0)])
def test_wilson_rejects_impossible_counts(k: int, n: int) -> None:
    with pytest.raises(ValueError, match=f"k={k}, n={n}"):
        wilson_interval(k, n)


def test_interval_block_is_wilson_of_the_count() -> None:
    block = interval_block({"clean_acc": 0.55}, 100)
    ci = binomtest(55, 100).proportion_ci(method="wilson")
    assert block == {"clean_acc": {"lo": round(ci.low, 6), "hi": round(ci.high, 6)}}


def test_mcnemar_exact_hand_values() -> None:
    # 1 vs 9 discordant: 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024, rel=1e-12)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024, rel=1e-12)
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0          # no discordant pair: no evidence of a difference
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_paired_comparison_counts_discordant_pairs_and_tests_them() -> None:
    # 100 examples: both right on 50, a only on 12, b only on 3, both wrong on 35.
    a = np.array([1] * 50 + [1] * 12 + [0] * 3 + [0] * 35, dtype=bool)
    b = np.array([1] * 50 + [0] * 12 + [1] * 3 + [0] * 35, dtype=bool)
    r = paired_comparison(a, b)
    assert (r.a_only, r.b_only, r.n) == (12, 3, 100)
    assert r.diff == pytest.approx(0.09)
    assert r.p_value == pytest.approx(binomtest(12, 15, 0.5).pvalue)
    assert r.lo < r.diff < r.hi


def test_paired_bootstrap_matches_the_normal_interval_on_a_large_sample() -> None:
    rng = np.random.default_rng(1)
    a = rng.random(2000) < 0.6
    b = np.where(rng.random(2000) < 0.8, a, ~a)          # agrees with a on ~80 % of examples
    d = a.astype(float) - b.astype(float)
    half = 1.959964 * d.std(ddof=1) / math.sqrt(d.size)
    r = paired_comparison(a, b, n_boot=4000)
    assert r.lo == pytest.approx(d.mean() - half, abs=0.004)
    assert r.hi == pytest.approx(d.mean() + half, abs=0.004)
    # Pairing: far narrower than the two accuracies' own intervals would suggest.
    assert r.hi - r.lo < 0.7 * 2 * 1.96 * math.sqrt(2 * 0.24 / d.size)


def test_paired_bootstrap_is_seeded_and_degenerate_cases_are_exact() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.random(300) < 0.5, rng.random(300) < 0.5
    assert paired_comparison(a, b) == paired_comparison(a, b)
    same = paired_comparison(a, a)
    assert (same.diff, same.lo, same.hi, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="same examples"):
        paired_comparison(a, b[:-1])


def test_stratified_seeds_average_per_seed_differences_and_sum_discordant_pairs() -> None:
    # seed 0: a better on 10 of 100; seed 1: no difference.
    a = np.zeros((100, 2), dtype=bool)
    b = np.zeros((100, 2), dtype=bool)
    a[:10, 0] = True
    r = paired_comparison(a, b)
    assert r.diff == pytest.approx(0.05) and (r.a_only, r.b_only) == (10, 0)
    assert r.p_value == pytest.approx(2 / 2 ** 10)


def test_bootstrap_mean_interval_covers_the_mean() -> None:
    x = np.linspace(0, 1, 201)
    lo, hi = bootstrap_mean_interval(x)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(x.size)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), abs=0.01)


def test_holm_hand_values() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
