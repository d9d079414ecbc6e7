"""Paired comparisons: each method against each reference baseline on the same test examples.

For clean accuracy and for the run's robust metric: the accuracy difference (points) with a
paired bootstrap 95 % interval and the exact McNemar p-value (pipeline_lib/stats.py says why
both), Holm-adjusted over every comparison in the table. A difference is called significant
when its Holm-adjusted p-value is below 0.05. With several training seeds the comparison is
stratified by seed: per-seed differences averaged, discordant pairs summed over seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..stats import holm, paired_comparison

ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    model: str
    baseline: str
    metric: str            # table column: clean, or the robust metric (autoattack, ...)
    model_acc: float       # points
    baseline_acc: float
    diff: float            # model - baseline, points
    lo: float              # paired bootstrap 95 % interval of diff, points
    hi: float
    n: int                 # examples (x seeds)
    model_only: int        # discordant: right for the model only
    baseline_only: int
    p_value: float         # exact McNemar, two-sided
    p_holm: float

    @property
    def significant(self) -> bool:
        return self.p_holm < ALPHA


def compare_models(correct: Mapping[str, Mapping[str, NDArray[np.bool_]]], models: Sequence[str],
                   baselines: Sequence[str], metrics: Sequence[str]) -> list[Comparison]:
    """Every model (baselines excepted) against every baseline on every metric both have per example.
    correct[model][metric] is (N,) or, stratified by seed, (N, R) correctness."""
    raw = []
    for base in baselines:
        if base not in correct:
            continue
        for m in models:
            if m == base or m in baselines or m not in correct:
                continue
            for metric in metrics:
                if metric not in correct[m] or metric not in correct[base]:
                    continue
                a, b = correct[m][metric], correct[base][metric]
                r = paired_comparison(a, b)
                raw.append((m, base, metric, 100.0 * float(np.mean(a)), 100.0 * float(np.mean(b)), r))
    adjusted = holm([r.p_value for *_, r in raw])
    return [Comparison(m, base, metric, ma, mb, 100.0 * r.diff, 100.0 * r.lo, 100.0 * r.hi,
                       int(np.size(correct[m][metric])), r.a_only, r.b_only, r.p_value, p)
            for (m, base, metric, ma, mb, r), p in zip(raw, adjusted, strict=True)]
