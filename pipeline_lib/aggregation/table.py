"""The comparison table as CSV (machine-readable, also DVC's plot data), Markdown (for people) and JSON (DVC metrics, gate input).

Columns, headers, number formats and alignment all come from the declared metrics (columns.py): a
registered attack gets its column here without an edit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from ..io import atomic_path, write_json, write_text
from ..evaluation.metric_spec import MetricSpec
from .columns import interval_columns, model_columns, numeric_columns
from .comparisons import ALPHA, Comparison
from .rows import ModelRow, Summary, summary_metrics

COMPARISON_COLUMNS: tuple[str, ...] = ("model", "baseline", "metric", "model_acc", "baseline_acc", "diff", "diff_lo",
                                       "diff_hi", "n", "model_only", "baseline_only", "p_mcnemar", "p_holm",
                                       "significant")
BLANK = "–"   # shown in Markdown where a metric was not measured (attack not run, no corruption stage, ...)


def csv_columns() -> tuple[str, ...]:
    """model, objective, role, every numeric column, robust_metric, then <column>_lo / <column>_hi: the 95 %
    bounds of each column with an interval (its MetricSpec says how it is made)."""
    bounds = tuple(f"{c}_{b}" for c in interval_columns() for b in ("lo", "hi"))
    return ("model", "objective", "role", *numeric_columns(), "robust_metric", *bounds)


def _csv_row(r: ModelRow) -> dict[str, Any]:
    bounds = {f"{c}_{b}": r.ci[c][i] if c in r.ci else None for c in interval_columns()
              for i, b in enumerate(("lo", "hi"))}
    return {"model": r.model, "objective": r.objective, "role": r.role, **r.values, "robust_metric": r.robust_metric,
            **bounds}


def summary_frame(s: Summary) -> pd.DataFrame:
    """One row per model, csv_columns(), NaN where blank."""
    cols = csv_columns()
    return pd.DataFrame([{c: _csv_row(r).get(c) for c in cols} for r in s.rows], columns=list(cols))


def write_csv(s: Summary, path: Path) -> None:
    frame = summary_frame(s).round(4)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _fmt(value: Any, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return BLANK
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _fmt_ci(r: ModelRow, spec: MetricSpec, marks: dict[tuple[str, str], str]) -> str:
    """`55.0 ±4.4`: the value and half the width of its 95 % interval (the CSV has the exact, possibly
    asymmetric, bounds), with a significance mark from `marks` when the paired comparison found one."""
    value = r.values[spec.key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return BLANK
    ci = r.ci.get(spec.key)
    text = _fmt(value, spec.digits, spec.signed)
    if ci is not None:
        text += f" ±{(ci[1] - ci[0]) / 2:.{spec.digits}f}"
    return text + marks.get((r.model, spec.key), "")


def _cell(r: ModelRow, spec: MetricSpec, marks: dict[tuple[str, str], str]) -> str:
    """A metric's Markdown cell: with its interval and significance mark when it has an interval."""
    return _fmt_ci(r, spec, marks) if spec.interval != "none" else _fmt(r.values[spec.key], spec.digits, spec.signed)


def _marks(s: Summary) -> dict[tuple[str, str], str]:
    """(model, column) -> ▲ / ▼ where the model is significantly above / below the first compare_to baseline."""
    if not s.comparisons:
        return {}
    first = s.comparisons[0].baseline
    out = {}
    for c in s.comparisons:
        if c.baseline == first and c.significant:
            col = "clean" if c.metric == "clean" else c.metric
            out[(c.model, col)] = " ▲" if c.diff > 0 else " ▼"
            if c.metric == s.robust_metric:
                out[(c.model, "robust")] = out[(c.model, col)]
    return out


def markdown(s: Summary) -> str:
    ctx = s.context
    marks = _marks(s)
    shown = [m for m in model_columns() if m.in_markdown]
    header = ["Model", "Objective", *(s.column_label(m.key) for m in shown), "Robust metric"]
    body = [[r.model + (" (ref)" if r.role == "reference" else ""), r.objective,
             *(_cell(r, m, marks) for m in shown),
             s.metric_label(r.robust_metric) if r.robust_metric else BLANK] for r in s.rows]
    table = pd.DataFrame(body, columns=header).to_markdown(
        index=False, disable_numparse=True, colalign=("left", "left", *["right"] * len(shown), "left"))

    n_eval = ctx.get("n_eval")
    lines = [
        "# Accuracy-robustness comparison", "",
        f"{ctx.get('dataset')} / {ctx.get('arch')}, L-inf eps {ctx.get('eps')}, "
        f"first {n_eval} test images." if not isinstance(n_eval, dict) else
        f"{ctx.get('dataset')} / {ctx.get('arch')}, L-inf eps {ctx.get('eps')}, test images per model: {n_eval}.",
        "Accuracies, NRR and ARDist in percent (points). "
        f"{BLANK} = not measured (attack not run, no corruption metrics, ...).",
        "`55.0 ±4.4` = the value and half the width of its 95 % interval over test examples (accuracies: Wilson "
        "score interval; corruption mean: bootstrap over images; ARDist: bootstrap over examples with the "
        "reference frontier refitted each time; exact bounds in summary.csv). "
        + (f"▲ / ▼ = significantly above / below {s.comparisons[0].baseline} on the same examples (exact McNemar, "
           f"Holm-corrected over the comparisons, p < {ALPHA}; see Paired comparisons below)."
           if s.comparisons else ""), "",
        table, "",
        f"- **Robust accuracy** for ARDist and the tradeoff plot: {s.robust_label()}.",
        "- **NRR** = 2 Nat Rob / (Nat + Rob) (CURE, App. F.2), with Rob = AutoAttack and with Rob = CW.",
        "- **Corruption (mean)** = accuracy over every corruption and severity; **mCE vs std** = mean over "
        "corruptions of the model's summed error divided by the standard model's (percent; standard = 100, "
        "lower is better; the standard model stands in for ImageNet-C's AlexNet, so it is not comparable "
        "with published mCE).",
    ]
    if s.curve is not None:
        ref = ("this run's " + ", ".join(p.method for p in s.reference_points) if s.reference_mode != "published"
               else f"{len(s.reference_points)} published points (listed below)")
        lines.append(f"- **ARDist** = signed Euclidean distance (points) from a model's (clean, robust) point to the "
                     f"reference tradeoff, positive beyond it (above/right). The project's definition "
                     f"(the ARREST paper's procedure was not available): the reference is the "
                     f"{s.curve.describe()}, of {ref}. Every reference lies on or below it: frontier references "
                     f"score 0, dominated ones less.")
    else:
        lines.append(f"- **ARDist**: {s.curve_error}")
    lines.append("- (ref) marks the reference models the frontier is built from.")
    if s.seed_stats:
        lines += ["", f"## Training seeds: mean ± std over {len(s.seeds)} seeds ({', '.join(map(str, s.seeds))})", "",
                  "Each seed retrains pretraining and every method; the table above is seed "
                  f"{s.seeds[0]}'s. The std is the spread between trainings; the ± above is the test-set "
                  "sampling of one model. Paired comparisons below are stratified by seed.", "", _seed_table(s)]
    if s.comparisons:
        lines += ["", "## Paired comparisons", "", comparisons_markdown(s.comparisons)]

    if s.sweeps:
        lines += ["", "## Sweeps: Bjontegaard-style mean gap", "",
                  "Mean vertical gap (points) between the sweep's fitted curve and the reference curve over their "
                  "common clean-accuracy range; positive = the sweep lies above the reference tradeoff.", ""]
        rows = [[sw.objective, ", ".join(sw.models), _fmt(sw.mean_gap, signed=True),
                 f"[{sw.overlap[0]:.2f}, {sw.overlap[1]:.2f}]" if sw.overlap else BLANK, sw.reason or ""]
                for sw in s.sweeps]
        lines.append(pd.DataFrame(rows, columns=["Objective", "Instances", "Mean gap", "Clean range", "Note"])
                     .to_markdown(index=False, disable_numparse=True))

    if s.reference_points:
        lines += ["", "## Reference points", ""]
        rows = [[p.method, f"{p.standard:.2f}", f"{p.robust:.2f}", p.source] for p in s.reference_points]
        robust_col = "AutoAttack" if s.reference_mode == "published" else s.robust_label()
        lines.append(pd.DataFrame(rows, columns=["Method", "Clean", robust_col, "Source"])
                     .to_markdown(index=False, disable_numparse=True))
    if s.notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in s.notes)]
    return "\n".join(lines) + "\n"


def _seed_table(s: Summary) -> str:
    shown = {m.key for m in model_columns() if m.in_markdown}
    cols = [c for c in interval_columns() if c in shown and any(c in st for st in s.seed_stats.values())]
    body = [[r.model, *(f"{st[c][0]:.1f} ± {st[c][1]:.1f}" if c in st else BLANK for c in cols)]
            for r in s.rows if (st := s.seed_stats.get(r.model, {})) is not None]
    return pd.DataFrame(body, columns=["Model", *(s.column_label(c) for c in cols)]).to_markdown(
        index=False, disable_numparse=True)


def comparisons_frame(comparisons: list[Comparison]) -> pd.DataFrame:
    rows = [(c.model, c.baseline, c.metric, c.model_acc, c.baseline_acc, c.diff, c.lo, c.hi, c.n, c.model_only,
             c.baseline_only, c.p_value, c.p_holm, c.significant) for c in comparisons]
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def comparisons_markdown(comparisons: list[Comparison]) -> str:
    """The comparisons as a Markdown table with a line on how to read it."""
    rows = [[c.model, c.baseline, c.metric, f"{c.model_acc:.1f}", f"{c.baseline_acc:.1f}",
             f"{c.diff:+.1f} [{c.lo:+.1f}, {c.hi:+.1f}]", f"{c.model_only} / {c.baseline_only}", f"{c.p_value:.3g}",
             f"{c.p_holm:.3g}", "yes" if c.significant else "no"] for c in comparisons]
    table = pd.DataFrame(rows, columns=["Model", "Baseline", "Metric", "Model acc", "Baseline acc",
                                        "Difference [95 % CI]", "Discordant (model / baseline)", "McNemar p",
                                        "Holm p", "Significant"]).to_markdown(index=False, disable_numparse=True)
    return (f"Each model against the baseline on the same {comparisons[0].n if comparisons else 0} test examples. "
            "Difference = model minus baseline (points) with a paired bootstrap 95 % interval; discordant = "
            "examples only one of the two gets right; McNemar p = exact two-sided binomial test on them; "
            f"Holm p = corrected for the {len(comparisons)} comparisons; significant when Holm p < {ALPHA}.\n\n"
            + table + "\n")


def write_comparisons(comparisons: list[Comparison], csv_path: Path, md_path: Path) -> None:
    frame = comparisons_frame(comparisons).round(6)
    with atomic_path(csv_path) as tmp:
        frame.to_csv(tmp, index=False)
    write_text(md_path, "# Paired comparisons\n\n" + (comparisons_markdown(comparisons) if comparisons else
                                                       "No comparison: no baseline of aggregate.compare_to with a "
                                                       "per-example record.\n"))


def write_markdown(s: Summary, path: Path) -> None:
    write_text(path, markdown(s))


def write_summary_json(s: Summary, path: Path) -> None:
    write_json(path, summary_metrics(s))
