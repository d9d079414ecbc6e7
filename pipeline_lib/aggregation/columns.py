"""The aggregate's columns: every metric it reports per model, each declared once, in table order.

The evaluate stage's metrics come from the evaluation registry (clean, each registered attack in
registration order, worst case: evaluation/registry.py declares them, an attack in its own
registration); the metrics the aggregate derives from them are declared here. The metrics
reader, the typed rows, the table (CSV, Markdown, JSON), the plot, MLflow, the params'
robust-metric and gate-rule validation and the gate all read these lists, so a new attack
reaches all of them through its registration. Functions, not constants: an attack registered
after import (a plug-in, a test's dummy) is seen.
"""

from __future__ import annotations

from ..evaluation.metric_spec import MetricSpec

# The run's robust accuracy: the chosen robust metric's column under one name (its interval, its examples).
ROBUST = MetricSpec("robust", "Robust", in_markdown=False)
DERIVED: tuple[MetricSpec, ...] = (
    MetricSpec("nrr_aa", "NRR (AA)", interval="none", per_example=False, digits=2),
    MetricSpec("nrr_cw", "NRR (CW)", interval="none", per_example=False, digits=2),
    # ARDist: bootstrap over test examples, references refitted on every resample (frontier.py).
    MetricSpec("ardist", "ARDist", interval="bootstrap", per_example=False, signed=True),
    # Mean over corruptions x severities of the same images: bootstrap over images (the corruption stage's).
    MetricSpec("corruption", "Corruption (mean)", interval="bootstrap", per_example=False),
    # Percent of the standard model's corruption error: lower is better.
    MetricSpec("mce_std", "mCE vs std", direction="lower", interval="none", per_example=False),
    MetricSpec("train_time_s", "Train time (s)", direction="lower", interval="none", per_example=False),
)
# NRR column -> the attack whose accuracy is its robust input (CURE, App. F.2: AutoAttack and CW).
NRR_OF: dict[str, str] = {"nrr_aa": "autoattack", "nrr_cw": "cw"}
# Per sweep (objective with several instances), not per model.
MEAN_GAP = MetricSpec("mean_gap", "Mean gap", interval="none", per_example=False, signed=True, digits=2)


def eval_metrics() -> list[MetricSpec]:
    """The evaluate stage's declared metrics. Imported when first asked: the registry holds the attacks
    (torch), and importing the params schema (config -> aggregation.config -> here) must not load torch."""
    from ..evaluation.registry import eval_metrics as registered

    return list(registered())


def model_columns() -> list[MetricSpec]:
    """Every per-model metric of the aggregate, in table order."""
    return [*eval_metrics(), ROBUST, *DERIVED]


def by_key() -> dict[str, MetricSpec]:
    """Every declared metric by key, the sweeps' mean gap included."""
    return {m.key: m for m in (*model_columns(), MEAN_GAP)}


def numeric_columns() -> tuple[str, ...]:
    return tuple(m.key for m in model_columns())


def eval_columns() -> tuple[str, ...]:
    """Columns read from the evaluate stage's metrics JSON."""
    return tuple(m.key for m in eval_metrics())


def interval_columns() -> tuple[str, ...]:
    """Columns with a 95 % interval (<key>_lo / <key>_hi); also those reported as mean ± std over seeds."""
    return tuple(m.key for m in model_columns() if m.interval != "none")


def per_example_columns() -> tuple[str, ...]:
    return tuple(m.key for m in model_columns() if m.per_example)


def robust_keys() -> tuple[str, ...]:
    """Metrics aggregate.robust_metric / robust_fallback may name."""
    return tuple(m.key for m in model_columns() if m.robust)


def gate_metric_keys() -> tuple[str, ...]:
    """Names the gate's per-metric rules may use."""
    return (*numeric_columns(), MEAN_GAP.key)
