"""The comparison table as CSV (machine-readable, also DVC's plot data), Markdown (for people) and JSON (DVC metrics, gate input)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from ..io import atomic_path, write_json, write_text
from .summary import NUMERIC_COLUMNS, Summary, summary_metrics

CSV_COLUMNS: tuple[str, ...] = ("model", "objective", "role", *NUMERIC_COLUMNS, "robust_metric")
BLANK = "–"   # shown in Markdown where a metric was not measured (attack not run, no corruption stage, ...)


def summary_frame(s: Summary) -> pd.DataFrame:
    """One row per model, CSV_COLUMNS, NaN where blank."""
    return pd.DataFrame([{c: r.get(c) for c in CSV_COLUMNS} for r in s.rows], columns=list(CSV_COLUMNS))


def write_csv(s: Summary, path: Path) -> None:
    frame = summary_frame(s).round(4)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _fmt(value: Any, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return BLANK
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(s: Summary) -> str:
    ctx = s.context
    pgd = s.pgd_label()
    header = ["Model", "Objective", "Clean", "FGSM", pgd, "CW", "AutoAttack", "Worst case", "NRR (AA)", "NRR (CW)",
              "ARDist", "Corruption (mean)", "mCE vs std", "Train time (s)", "Robust metric"]
    body = [[r["model"] + (" (ref)" if r["role"] == "reference" else ""), r["objective"],
             *(_fmt(r[c]) for c in ("clean", "fgsm", "pgd", "cw", "autoattack", "worst_case", "nrr_aa", "nrr_cw")),
             _fmt(r["ardist"], signed=True), _fmt(r["corruption"]), _fmt(r["mce_std"], 1), _fmt(r["train_time_s"], 1),
             s.metric_label(r["robust_metric"]) if r["robust_metric"] else BLANK] for r in s.rows]
    table = pd.DataFrame(body, columns=header).to_markdown(
        index=False, disable_numparse=True, colalign=("left", "left", *["right"] * 12, "left"))

    n_eval = ctx.get("n_eval")
    lines = [
        "# Accuracy-robustness comparison", "",
        f"{ctx.get('dataset')} / {ctx.get('arch')}, L-inf eps {ctx.get('eps')}, "
        f"first {n_eval} test images." if not isinstance(n_eval, dict) else
        f"{ctx.get('dataset')} / {ctx.get('arch')}, L-inf eps {ctx.get('eps')}, test images per model: {n_eval}.",
        "Accuracies, NRR and ARDist in percent (points). "
        f"{BLANK} = not measured (attack not run, no corruption metrics, ...).", "",
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
                     f"reference tradeoff curve, positive beyond it (above/right). The project's definition "
                     f"(the ARREST paper's procedure was not available). Curve: {s.curve.describe()}, fitted to {ref}.")
    else:
        lines.append(f"- **ARDist**: {s.curve_error}")
    lines.append("- (ref) marks the reference models the curve is fitted to.")

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


def write_markdown(s: Summary, path: Path) -> None:
    write_text(path, markdown(s))


def write_summary_json(s: Summary, path: Path) -> None:
    write_json(path, summary_metrics(s))
