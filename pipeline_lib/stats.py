"""Uncertainty of accuracies measured on a finite test set: intervals, paired tests, Holm.

Every accuracy the pipeline reports is a count k of n test examples. The choices:

- **One accuracy: Wilson score interval** (95 %). k correct of n examples is a binomial
  proportion (the examples are a sample of the test distribution; the model is fixed).
  Wilson keeps close to nominal coverage for small n and for accuracies near 0 or 100 %
  (a robust accuracy of 2 %, a standard model's 0 % AutoAttack) where the normal (Wald)
  interval collapses to zero width or leaves [0, 1]; Clopper-Pearson is guaranteed but
  needlessly wide (coverage well above 95 %). Closed form: no resampling, deterministic.
- **A mean over correlated cells (corruption accuracy over corruptions x severities of
  the same images): percentile bootstrap over images.** The cells share the images, so
  the 75 x n outcomes are not independent trials and a binomial interval on them would
  be far too narrow; resampling whole images keeps each image's cells together.
- **Two models on the same examples: paired.** The difference of accuracies gets a paired
  percentile bootstrap interval (resample example indices, the same for both models), and
  the exact McNemar test: under "no difference" the discordant examples (right for one
  model only) split 50/50, a two-sided binomial test on them (scipy.stats.binomtest).
  Pairing removes the between-example variance both models share, so it detects far
  smaller differences than comparing two independent intervals.
- **Several comparisons: Holm's step-down correction** of the McNemar p-values (controls
  the family-wise error rate, never less powerful than Bonferroni).

Bootstraps are seeded (numpy Generator): the same inputs give the same interval.
Accuracies here are fractions in [0, 1]; callers scale to points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import binomtest, norm

LEVEL = 0.95
N_BOOT = 2000
BOOT_SEED = 0


def _z(level: float) -> float:
    return float(norm.ppf(0.5 + level / 2))


def wilson_interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (fractions)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"Wilson interval needs 0 <= k <= n and n > 0; got k={k}, n={n}")
    z = _z(level)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamp float round-off at the ends (k = 0 or n gives exactly 0 / 1 analytically).
    return max(0.0, centre - half) if k else 0.0, min(1.0, centre + half) if k < n else 1.0


def accuracy_interval(acc: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson interval of an accuracy fraction measured on n examples (k recovered as round(acc * n))."""
    return wilson_interval(int(round(acc * n)), n, level)


def _as_matrix(values: ArrayLike) -> NDArray[np.float64]:
    a = np.asarray(values, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def bootstrap_indices(n: int, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> NDArray[np.int64]:
    """(n_boot, n) example indices drawn with replacement: share them to resample several models jointly."""
    if n <= 0:
        raise ValueError(f"bootstrap needs at least one example; got n={n}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(samples: ArrayLike, level: float = LEVEL) -> tuple[float, float]:
    lo, hi = np.quantile(np.asarray(samples, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_mean_interval(per_example: ArrayLike, level: float = LEVEL, n_boot: int = N_BOOT,
                            seed: int = BOOT_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-example values (N,), e.g. an image's
    accuracy over every corruption x severity."""
    x = np.asarray(per_example, dtype=np.float64).ravel()
    idx = bootstrap_indices(x.size, n_boot, seed)
    return percentile_interval(x[idx].mean(1), level)


@dataclass(frozen=True)
class PairedResult:
    diff: float                  # mean(a) - mean(b), fraction
    lo: float                    # paired bootstrap interval of diff
    hi: float
    n: int
    a_only: int                  # discordant: right for a, wrong for b
    b_only: int
    p_value: float               # exact McNemar, two-sided


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of a_only of the a_only + b_only discordant pairs at 1/2."""
    m = a_only + b_only
    return 1.0 if m == 0 else float(binomtest(a_only, m, 0.5).pvalue)


def paired_comparison(a: ArrayLike, b: ArrayLike, level: float = LEVEL, n_boot: int = N_BOOT,
                      seed: int = BOOT_SEED) -> PairedResult:
    """Model a against model b on the same examples; a, b are (N,) correctness (bool or 0/1).

    Several replicates (seeds) of the pair: pass (N, R) arrays, column r of a paired with
    column r of b. The difference is then the mean over replicates of the per-seed differences
    (a stratified comparison), the bootstrap resamples examples jointly for every replicate, and
    the discordant counts are summed over replicates (each (example, seed) pair is one trial)."""
    ma, mb = _as_matrix(a), _as_matrix(b)
    if ma.shape != mb.shape:
        raise ValueError(f"paired comparison needs the same examples on both sides; got shapes {ma.shape} and "
                         f"{mb.shape}")
    d = ma - mb                                          # (N, R) per-example difference in {-1, 0, 1}
    idx = bootstrap_indices(d.shape[0], n_boot, seed)
    boot = d[idx].mean(axis=(1, 2))                      # (B,) resampled mean difference
    lo, hi = percentile_interval(boot, level)
    a_only, b_only = int(((ma > 0.5) & (mb < 0.5)).sum()), int(((ma < 0.5) & (mb > 0.5)).sum())
    return PairedResult(float(d.mean()), lo, hi, d.shape[0], a_only, b_only, mcnemar_exact(a_only, b_only))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (same order as given): p_(i) * (m - i + 1), made monotone, capped at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def interval_block(acc: dict[str, float], n: int, level: float = LEVEL) -> dict[str, dict[str, float]]:
    """{key: {"lo", "hi"}} Wilson bounds (fractions, 6 decimals) of accuracy fractions measured on n examples:
    the `ci95` block the evaluate and corruption stages add to their metrics JSON."""
    return {k: dict(zip(("lo", "hi"), (round(b, 6) for b in accuracy_interval(v, n, level)), strict=True))
            for k, v in acc.items()}
