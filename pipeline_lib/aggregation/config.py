"""The `aggregate` params section: which robust accuracy to compare on, the ARDist
reference, and the regression gate's per-metric tolerances.

Units: every accuracy-like metric of the aggregate (clean, robust, NRR, ARDist,
mean gap, corruption) is in percentage points, so tolerances are in points too.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..schema import StrictModel
from .columns import by_key, gate_metric_keys, robust_keys

CurveFamily = Literal["auto", "linear", "quadratic"]


def reference_tables() -> list[str]:
    """Names of the published reference tables shipped in pipeline_lib/references (file stems)."""
    root = resources.files("pipeline_lib") / "references"
    return sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".csv"))


class GateRule(StrictModel):
    """How one metric may move before the gate calls it a regression.

    A move against `direction` larger than max(abs_tol, rel_tol * |baseline|) is a
    regression; the same move in the good direction is reported as an improvement.
    """

    # which way is better; None: the metric's declared direction (aggregation/columns.py)
    direction: Literal["higher", "lower", "ignore"] | None = None
    abs_tol: float = Field(default=0.0, ge=0)   # in the metric's unit (points for accuracies)
    rel_tol: float = Field(default=0.0, ge=0)   # fraction of |baseline|

    def allowed(self, baseline: float) -> float:
        return max(self.abs_tol, self.rel_tol * abs(baseline))

    def direction_of(self, metric: str) -> str:
        """This rule's direction for `metric`: its own, else the metric's declared one (higher if undeclared)."""
        if self.direction is not None:
            return self.direction
        spec = by_key().get(metric)
        return spec.direction if spec is not None else "higher"


class GateParams(StrictModel):
    """Accuracies with a per-example record on both sides (columns.per_example_columns()) are gated paired:
    a regression is a drop larger than `min_effect` points whose paired bootstrap interval against the
    baseline's own examples excludes zero, the interval's level Bonferroni-corrected over the paired checks
    (1 - alpha / checks) so that `alpha` bounds the chance of any false alarm. The rules below gate the rest
    (and everything when the baseline holds no per-example record).

    Training seeds: the paired interval only knows the test set's noise. A baseline written from a run with
    `replicates` also stores each metric's std over training seeds (`seed_std`); a drop must then also exceed
    `seed_sd_factor` such stds, so that retraining (another seed, or any change of the training bits) is not
    mistaken for a regression."""

    default: GateRule = GateRule(abs_tol=5.0)
    metrics: dict[str, GateRule] = Field(default_factory=dict)   # per-metric overrides of `default`
    alpha: float = Field(default=0.05, gt=0, lt=1)               # family-wise false-alarm rate of the paired checks
    min_effect: float = Field(default=2.0, ge=0)                 # points: smaller drops never fail
    seed_sd_factor: float = Field(default=3.0, ge=0)             # x the baseline's seed std (when it has one)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: dict[str, GateRule]) -> dict[str, GateRule]:
        known = gate_metric_keys()
        unknown = sorted(set(v) - set(known))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(known)}")
        return v

    def rule(self, metric: str) -> GateRule:
        return self.metrics.get(metric, self.default)


class AggregateParams(StrictModel):
    # Robust accuracy for ARDist, the sweep gaps and the plot: the first of
    # [robust_metric, *robust_fallback] that the evaluate stage wrote for every model
    # (NRR always uses AutoAttack and CW themselves, blank where they were not run).
    robust_metric: str = "autoattack"   # a metric declared `robust` (columns.robust_keys())
    robust_fallback: list[str] = Field(default_factory=lambda: ["worst_case", "cw", "pgd"])
    # ARDist reference points: `own` = this run's models named in reference_models (those
    # present); `models` = the same, but every one must be in evaluate.models (trained or
    # imported with `external`: a published model measured under this run's attacks);
    # `published` = rows of pipeline_lib/references/<published_table>.csv whose
    # method is in reference_models (and source_id in published_sources, if given).
    reference: Literal["own", "models", "published"] = "own"
    reference_models: list[str] = Field(default_factory=lambda: ["standard", "pgd_at", "trades", "mart"],
                                        min_length=1)
    published_table: str = "cifar10_wrn34_10"
    published_sources: list[str] | None = None
    curve: CurveFamily = "auto"   # the sweeps' fitted curves; the reference is always the Pareto frontier
    # Paired comparisons (table `comparisons`): every other model against each of these, same test examples.
    compare_to: list[str] = Field(default_factory=lambda: ["pgd_at"])
    gate: GateParams = GateParams()

    @field_validator("robust_metric", "robust_fallback")
    @classmethod
    def _robust(cls, v: str | list[str]) -> str | list[str]:
        known = robust_keys()
        unknown = [m for m in ([v] if isinstance(v, str) else v) if m not in known]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))} cannot be the robust metric; robust metrics: "
                             f"{', '.join(known)}")
        return v

    @field_validator("published_table")
    @classmethod
    def _known_table(cls, v: str) -> str:
        tables = reference_tables()
        if v not in tables:
            raise ValueError(f"unknown published table {v!r}; shipped: {', '.join(tables) or 'none'}")
        return v

    @model_validator(mode="after")
    def _unique(self) -> AggregateParams:
        order = [self.robust_metric, *self.robust_fallback]
        if len(set(order)) != len(order):
            raise ValueError(f"robust_metric + robust_fallback repeat a metric: {order}")
        if len(set(self.reference_models)) != len(self.reference_models):
            raise ValueError(f"reference_models has duplicates: {self.reference_models}")
        return self

    @property
    def robust_order(self) -> list[str]:
        return [self.robust_metric, *self.robust_fallback]
