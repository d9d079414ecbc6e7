"""A metric's declaration: everything the pipeline needs to know about one column of the results.

One `MetricSpec` per metric, written once where the metric is made: the evaluate stage's own
accuracies (clean, worst case) and each registered attack's accuracy in evaluation/registry.py
(an attack carries its spec in its registration), the aggregate's derived metrics (robust,
NRR, ARDist, corruption, ...) in aggregation/columns.py. Readers: the gradient-masking flags
(evaluation/sanity.py), the evaluation plot, the aggregate's metrics reader, rows, table, plot,
MLflow logging, the robust-metric choice in the params and the regression gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["higher", "lower"]
# wilson: Wilson score interval of a count over the test images; bootstrap: percentile bootstrap over
# examples (made by whoever computes the metric); none: no interval
Interval = Literal["wilson", "bootstrap", "none"]
# clean: the clean accuracy every attack accuracy is bounded by; attack: one attack's robust accuracy
# (<= clean); worst_case: robust to every attack (<= each attack); derived: computed by the aggregate
Role = Literal["clean", "attack", "worst_case", "derived"]


@dataclass(frozen=True)
class AtMost:
    """A gradient-masking check: this attack should leave at most `weaker`'s accuracy (a stronger attack
    doing worse suggests masked gradients). Checks sharing `flag` form one sanity flag; `why` ends its message."""

    weaker: str   # key of the attack this one must not lose to
    flag: str     # sanity flag name in the evaluate stage's metrics JSON
    why: str


@dataclass(frozen=True)
class MetricSpec:
    key: str                       # column in the table / summary JSON; the evaluate stage writes <key>_acc
    label: str                     # column header
    role: Role = "derived"
    direction: Direction = "higher"
    robust: bool = False           # may be aggregate.robust_metric (an accuracy under attack)
    interval: Interval = "wilson"  # how its 95 % interval is made
    per_example: bool = True       # rebuilt per test example from the evaluate record: paired comparisons, gate
    at_most: tuple[AtMost, ...] = ()   # gradient-masking orderings against other attacks
    digits: int = 1                # decimals in the Markdown table
    signed: bool = False           # shown with its sign (+1.2)
    in_markdown: bool = True       # a column of the Markdown table (the CSV and JSON hold every metric)
    long_label: str | None = None  # as the robust metric ("Robust accuracy: ..."); default `label`
    steps_from: str | None = None  # context key whose integer value qualifies the label (PGD -> PGD-20)

    @property
    def eval_key(self) -> str:
        """Key of the evaluate stage's metrics JSON (a fraction)."""
        return f"{self.key}_acc"

    def title(self, context: dict[str, object] | None = None) -> str:
        steps = (context or {}).get(self.steps_from) if self.steps_from else None
        return f"{self.label}-{steps}" if isinstance(steps, int) and not isinstance(steps, bool) else self.label

    def robust_title(self, context: dict[str, object] | None = None) -> str:
        return self.long_label if self.long_label is not None else self.title(context)
