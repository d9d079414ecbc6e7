"""The comparison's typed rows and how they are computed: robust metric choice, NRR, ARDist, sweep mean gaps.

Pure computation (no files): `build_summary` returns a `Summary` of `ModelRow`s that table.py,
plot.py and the MLflow logging all read, so the three always show the same numbers. A row's
numeric columns are the declared ones (columns.py), so a registered attack has its column here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from dataclasses import dataclass, field
from typing import Any, Literal

from ..corruption.mce import REFERENCE as CORRUPTION_REFERENCE
from ..corruption.mce import relative_to_reference
from ..stats import bootstrap_indices
from .ardist import ardist_bootstrap, mean_gap, signed_distance
from .columns import NRR_OF, by_key, eval_columns, interval_columns, numeric_columns
from .comparisons import Comparison, compare_models
from .config import AggregateParams
from .curve import CurveFitError, TradeoffCurve, fit_tradeoff_curve
from .frontier import FrontierCurve, fit_frontier
from .metrics_io import ModelMetrics
from .nrr import nrr
from .records import Correctness
from .references import ReferencePoint, own_points, published_points

log = logging.getLogger(__name__)


@dataclass
class ModelRow:
    """One model's line of the comparison."""

    model: str
    objective: str
    robust_metric: str | None            # the column `robust` copies; None when the model has no robust metric
    values: dict[str, float | None]      # every numeric column (columns.numeric_columns(), in order); None = blank
    role: Literal["reference", "method"] = "method"
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)   # 95 % bounds per column, points

    @property
    def clean(self) -> float:
        value = self.values["clean"]
        assert value is not None   # the metrics reader refuses a model without clean accuracy
        return value

    @property
    def robust(self) -> float | None:
        return self.values["robust"]

    @property
    def ardist(self) -> float | None:
        return self.values["ardist"]


@dataclass(frozen=True)
class SweepResult:
    objective: str
    models: list[str]
    curve: TradeoffCurve | None
    mean_gap: float | None
    overlap: tuple[float, float] | None
    reason: str | None = None        # why the gap is blank


@dataclass
class Summary:
    rows: list[ModelRow]                       # one per model, in evaluate.models order
    robust_metric: str | None                  # the run-wide robust metric, None if models differ
    reference_mode: str
    reference_points: list[ReferencePoint]
    curve: FrontierCurve | None
    curve_error: str | None
    sweeps: list[SweepResult]
    context: dict[str, Any]                    # dataset, arch, eps, n_eval, pgd_steps: what the numbers mean
    notes: list[str] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)   # paired, vs aggregate.compare_to
    seeds: list[int] = field(default_factory=list)                # training seeds behind seed_stats (>= 2)
    # model -> column -> (mean, sample std) over the training seeds; empty with one seed
    seed_stats: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)

    def column_label(self, key: str) -> str:
        """A column's header, qualified by the run's context (PGD -> PGD-20)."""
        return by_key()[key].title(self.context)

    def metric_label(self, metric: str) -> str:
        """A robust metric's name as the table's notes and the plot's axis say it."""
        return by_key()[metric].robust_title(self.context)

    def robust_label(self) -> str:
        return "best available per model" if self.robust_metric is None else self.metric_label(self.robust_metric)


def choose_robust_metric(models: Sequence[ModelMetrics], order: Sequence[str]) -> dict[str, str | None]:
    """Robust metric per model: the first of `order` that every model has, so that all points
    are comparable; if none is shared, each model's own first available one (None if none)."""
    shared = next((m for m in order if all(m in mm.acc for mm in models)), None)
    if shared is not None:
        return {mm.name: shared for mm in models}
    return {mm.name: next((m for m in order if m in mm.acc), None) for mm in models}


def _context(models: Sequence[ModelMetrics], dataset: str | None, arch: str | None) -> dict[str, Any]:
    """What the numbers mean; a per-model mapping where the models disagree (e.g. different n_eval)."""
    ctx: dict[str, Any] = {"dataset": dataset, "arch": arch}
    for key in ("eps", "n_eval", "pgd_steps", "cascade"):
        values = {mm.name: getattr(mm, key) for mm in models}
        distinct = set(values.values())
        ctx[key] = distinct.pop() if len(distinct) == 1 else values
    return ctx


def _fit_sweeps(models: Sequence[ModelMetrics], rows: Mapping[str, ModelRow],
                reference: FrontierCurve | None, family: str) -> list[SweepResult]:
    """One SweepResult per objective with 2+ instances (a knob swept), in first-appearance order."""
    groups: dict[str, list[str]] = {}
    for mm in models:
        groups.setdefault(mm.objective, []).append(mm.name)
    out = []
    for objective, names in groups.items():
        if len(names) < 2:
            continue
        pts = [(rows[n].clean, rows[n].robust) for n in names if rows[n].robust is not None]
        try:
            curve = fit_tradeoff_curve([p[0] for p in pts], [p[1] for p in pts], family)  # type: ignore[arg-type]
        except CurveFitError as exc:
            out.append(SweepResult(objective, names, None, None, None, f"no sweep curve: {exc}"))
            continue
        if reference is None:
            out.append(SweepResult(objective, names, curve, None, None, "no reference curve"))
            continue
        gap = mean_gap(curve, reference)
        lo, hi = max(curve.x_min, reference.x_min), min(curve.x_max, reference.x_max)
        out.append(SweepResult(objective, names, curve, gap, (lo, hi) if gap is not None else None,
                               None if gap is not None else
                               f"standard-accuracy ranges do not overlap (sweep [{curve.x_min:.2f}, "
                               f"{curve.x_max:.2f}], reference [{reference.x_min:.2f}, {reference.x_max:.2f}])"))
    return out


def _model_row(mm: ModelMetrics, metric: str | None) -> ModelRow:
    values: dict[str, float | None] = dict.fromkeys(numeric_columns())
    values.update({c: mm.acc.get(c) for c in eval_columns()})
    values.update(robust=mm.acc.get(metric) if metric else None, corruption=mm.corruption,
                  train_time_s=mm.train_time_s)
    clean = values["clean"]
    for col, attack in NRR_OF.items():
        rob = values.get(attack)
        values[col] = nrr(clean, rob) if rob is not None and clean is not None else None
    return ModelRow(mm.name, mm.objective, metric, values)


def _mce_vs_standard(models: Sequence[ModelMetrics], notes: list[str]) -> dict[str, float | None]:
    """mCE relative to the run's standard model, in percent (standard = 100), for every model with a
    per-corruption table; {} (blank column) when the standard model has none."""
    detail = {mm.name: mm.corruption_detail for mm in models if mm.corruption_detail is not None}
    if not detail:
        return {}
    if CORRUPTION_REFERENCE not in detail:
        notes.append(f"no mCE vs standard: the {CORRUPTION_REFERENCE!r} model has no corruption metrics")
        return {}
    try:
        rel = relative_to_reference(detail)
    except (KeyError, TypeError, ValueError) as exc:
        notes.append(f"no mCE vs standard: {exc}")
        return {}
    return {n: None if r["mce_vs_standard"] is None else 100.0 * r["mce_vs_standard"] for n, r in rel.items()}


def _reference_points(ap: AggregateParams, rows: Mapping[str, ModelRow], run_metric: str | None,
                      dataset: str | None, arch: str | None, notes: list[str]) -> list[ReferencePoint]:
    """The points the reference curve goes through; appends a note when they are not comparable to the run."""
    if ap.reference != "published":   # own, models: points measured in this run
        return own_points(ap.reference_models, {n: r.clean for n, r in rows.items()},
                          {n: r.robust for n, r in rows.items()})
    points = published_points(ap.published_table, ap.reference_models, ap.published_sources)
    if run_metric != "autoattack":
        notes.append(f"the published reference points are AutoAttack accuracies but this run compares on "
                     f"{run_metric or 'mixed metrics'}: ARDist mixes attacks")
    mismatched = sorted({f"{p.dataset}/{p.arch}" for p in points} - {f"{dataset}/{arch}"})
    if mismatched:
        notes.append(f"published reference points are for {', '.join(mismatched)}, this run is "
                     f"{dataset}/{arch}: ARDist compares across setups")
    return points


def _intervals(models: Sequence[ModelMetrics], rows: Mapping[str, ModelRow], ap: AggregateParams,
               points: Sequence[ReferencePoint], curve: FrontierCurve | None,
               correctness: Mapping[str, Correctness]) -> None:
    """rows[m].ci: the 95 % bounds of every column that has them; ARDist's by a joint bootstrap over
    test examples when every model (and, with own references, every reference) has its record."""
    for mm in models:
        row = rows[mm.name]
        row.ci = dict(mm.ci)
        if row.robust_metric in mm.ci:
            row.ci["robust"] = mm.ci[row.robust_metric]
    have = {n: (c["clean"], c[rows[n].robust_metric]) for n, c in correctness.items()   # type: ignore[index]
            if n in rows and rows[n].robust_metric in c}
    refs = [p.method for p in points] if ap.reference != "published" else None
    if curve is None or not have or (refs is not None and not set(refs) <= set(have)):
        return
    idx = bootstrap_indices(len(next(iter(have.values()))[0]))
    for n, bounds in ardist_bootstrap(have, refs, None if refs is not None else curve, idx).items():
        rows[n].ci["ardist"] = bounds


@dataclass(frozen=True)
class Replicate:
    """One extra training seed's models: their metrics and per-example correctness (may be empty)."""

    seed: int
    models: list[ModelMetrics]
    correctness: dict[str, Correctness] = field(default_factory=dict)


def _seed_rows(models: Sequence[ModelMetrics], ap: AggregateParams, metric: str | None) -> dict[str, ModelRow]:
    """One seed's rows: accuracies, the robust metric and ARDist against that seed's own reference frontier."""
    rows = {mm.name: _model_row(mm, metric if metric in mm.acc else None) for mm in models}
    pts = own_points(ap.reference_models, {n: r.clean for n, r in rows.items()},
                     {n: r.robust for n, r in rows.items()}) if ap.reference != "published" else \
        published_points(ap.published_table, ap.reference_models, ap.published_sources)
    curve = fit_frontier([p.standard for p in pts], [p.robust for p in pts]) if pts else None
    for r in rows.values():
        r.values["ardist"] = signed_distance(curve, r.clean, r.robust) if curve and r.robust is not None else None
    return rows


def _seed_stats(first: Mapping[str, ModelRow], replicates: Sequence[Replicate], ap: AggregateParams,
                metric: str | None) -> dict[str, dict[str, tuple[float, float]]]:
    """model -> column -> (mean, sample std) over the first seed's rows and every replicate that has the model;
    the columns with an interval (sampling noise) get the spread between trainings too."""
    per_seed = [first] + [_seed_rows(r.models, ap, metric) for r in replicates]
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name in first:
        for col in interval_columns():
            vals = [v for rows in per_seed if name in rows and (v := rows[name].values[col]) is not None]
            if len(vals) >= 2:
                out.setdefault(name, {})[col] = (float(np.mean(vals)), float(np.std(vals, ddof=1)))
    return out


def _stack_seeds(first: Mapping[str, Correctness], replicates: Sequence[Replicate]) -> dict[str, Correctness]:
    """Per-example correctness as (N, R) over the seeds that have the model's record (stratified comparisons);
    a model/metric missing in some seed keeps only the first seed's (N,) column."""
    out: dict[str, Correctness] = {}
    for name, cols in first.items():
        out[name] = {}
        for k, v in cols.items():
            more = [r.correctness[name][k] for r in replicates if k in r.correctness.get(name, {})]
            out[name][k] = np.stack([v, *more], axis=1) if len(more) == len(replicates) and more else v
    return out


def build_summary(models: Sequence[ModelMetrics], ap: AggregateParams, dataset: str | None = None,
                  arch: str | None = None, correctness: Mapping[str, Correctness] | None = None,
                  replicates: Sequence[Replicate] = (), seed: int = 0) -> Summary:
    """Rows with NRR, ARDist and 95 % intervals, the reference frontier, sweep gaps and (given the
    per-example `correctness` of the models) the paired comparisons, for `models` under params `ap`.
    With `replicates` (training seeds other than `seed`): mean ± std over seeds, comparisons stratified by seed."""
    notes: list[str] = []
    choice = choose_robust_metric(models, ap.robust_order)
    distinct = set(choice.values())
    run_metric = next(iter(distinct)) if len(distinct) == 1 else None
    if run_metric is None:
        notes.append("models differ in the attacks evaluated, so the robust accuracy differs per model "
                     f"(column robust_metric): {choice}")
    elif run_metric != ap.robust_metric:
        lacking = [mm.name for mm in models if ap.robust_metric not in mm.acc]
        notes.append(f"robust accuracy is {run_metric}, not {ap.robust_metric}: {ap.robust_metric} is missing "
                     f"for {', '.join(lacking)}")
    rows = {mm.name: _model_row(mm, choice[mm.name]) for mm in models}

    points = _reference_points(ap, rows, run_metric, dataset, arch, notes)
    curve: FrontierCurve | None = None
    curve_error: str | None = None
    try:
        curve = fit_frontier([p.standard for p in points], [p.robust for p in points])
    except CurveFitError as exc:
        curve_error = (f"ARDist not computed: {exc} (reference={ap.reference}, "
                       f"reference_models={ap.reference_models})")
        notes.append(curve_error)
    # references: the run's own models (own) or the listed evaluated ones, imported included (models)
    ref_names = {p.method for p in points} if ap.reference != "published" else set()
    for n, row in rows.items():
        row.role = "reference" if n in ref_names else "method"
        row.values["ardist"] = (signed_distance(curve, row.clean, row.robust)
                                if curve is not None and row.robust is not None else None)

    for n, mce in _mce_vs_standard(models, notes).items():
        rows[n].values["mce_std"] = mce

    correctness = correctness or {}
    _intervals(models, rows, ap, points, curve, correctness)
    robust_cols = [run_metric] if run_metric is not None else []
    stacked = _stack_seeds(correctness, replicates) if replicates else correctness
    comparisons = compare_models(stacked, [mm.name for mm in models], ap.compare_to, ["clean", *robust_cols])
    seed_stats = _seed_stats(rows, replicates, ap, run_metric) if replicates else {}
    sweeps = _fit_sweeps(models, rows, curve, ap.curve)
    for note in notes:
        log.warning("%s", note)
    return Summary(rows=[rows[mm.name] for mm in models], robust_metric=run_metric, reference_mode=ap.reference, reference_points=points,
                   curve=curve, curve_error=curve_error, sweeps=sweeps, context=_context(models, dataset, arch),
                   notes=notes, comparisons=comparisons,
                   seeds=[seed, *(r.seed for r in replicates)] if replicates else [], seed_stats=seed_stats)


def summary_metrics(s: Summary) -> dict[str, Any]:
    """The JSON the stage writes as its DVC metrics file, which the gate also reads (and a baseline copies):
    {"models": {model: {metric: value}}, "sweeps": {objective: {"mean_gap": value}}, "context": {...}}.
    Blank metrics are left out (absent, not null), so a metric that vanishes is visible to the gate.
    Rounded to 1e-4 points: the evaluate stage's float32 fractions carry noise below that (0.36000001)."""
    models = {r.model: {c: round(float(v), 4) for c, v in r.values.items() if v is not None} for r in s.rows}
    sweeps = {sw.objective: {"mean_gap": round(sw.mean_gap, 4)} for sw in s.sweeps if sw.mean_gap is not None}
    ctx = {**s.context, "robust_metric": s.robust_metric or {r.model: r.robust_metric for r in s.rows},
           "reference": s.reference_mode}
    # 95 % bounds apart from `models`, so the gate's per-metric rules never see them as metrics
    ci95 = {r.model: {c: {"lo": round(lo, 4), "hi": round(hi, 4)} for c, (lo, hi) in r.ci.items()}
            for r in s.rows if r.ci}
    out = {"models": models, "sweeps": sweeps, "context": ctx, "ci95": ci95}
    if s.seed_stats:   # spread between trainings (sample std over s.seeds), for the gate's seed-aware tolerance
        out["seeds"] = list(s.seeds)
        out["seed_std"] = {m: {c: round(sd, 4) for c, (_, sd) in cols.items()} for m, cols in s.seed_stats.items()}
    return out
