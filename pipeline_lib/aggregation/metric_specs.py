"""Each accuracy column of the comparison, declared once: how it is labelled, which way is better,
whether it may be the robust metric, how its 95 % interval is made and whether its per-example
outcome is known (so it can be compared paired and gated against the baseline's own examples).

The table, the summary JSON's ci95 block, MLflow, the comparisons and the gate read this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Interval = Literal["wilson", "bootstrap", "none"]


@dataclass(frozen=True)
class MetricSpec:
    key: str                  # table / summary column
    label: str
    direction: Literal["higher", "lower"] = "higher"
    robust: bool = False      # may be aggregate.robust_metric
    interval: Interval = "wilson"
    per_example: bool = True  # rebuilt from the evaluate stage's record (paired comparisons, the gate)


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("clean", "Clean"),
    MetricSpec("fgsm", "FGSM", robust=True),
    MetricSpec("pgd", "PGD", robust=True),
    MetricSpec("cw", "CW", robust=True),
    MetricSpec("autoattack", "AutoAttack", robust=True),
    MetricSpec("worst_case", "Worst case", robust=True),
    MetricSpec("robust", "Robust"),                       # = the chosen robust metric's column
    # ARDist: bootstrap over test examples, references refitted on every resample (frontier.py).
    MetricSpec("ardist", "ARDist", interval="bootstrap", per_example=False),
    # Mean over corruptions x severities of the same images: bootstrap over images (stats.py).
    MetricSpec("corruption", "Corruption (mean)", interval="bootstrap", per_example=False),
)
BY_KEY = {s.key: s for s in SPECS}
INTERVAL_COLUMNS: tuple[str, ...] = tuple(s.key for s in SPECS if s.interval != "none")
PER_EXAMPLE_COLUMNS: tuple[str, ...] = tuple(s.key for s in SPECS if s.per_example)
