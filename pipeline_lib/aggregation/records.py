"""Per-example correctness of each model, read from the record CSV the evaluate stage writes.

metrics/eval_detail/<model>_record.csv has one row per test example: clean_correct, one
column per attack step (1 broken, 0 survived, empty not attacked) and `robust` (the worst
case over attacks). From it this module rebuilds, per model, a (N,) bool vector for every
accuracy column of the table (clean, each attack's, worst_case): the inputs of
the paired comparisons, ARDist's bootstrap and the variance-aware gate.

A metric's steps are the columns named after it (AutoAttack: `autoattack/<component>`);
in a cascade run an attack only saw what earlier steps left robust, so there an example
counts as robust for a metric when no worst-case step up to the metric's last one broke it
(the rule of evaluation.record_metrics.metric_columns). Every rebuilt vector is checked against the
accuracy in the model's metrics JSON: a record from another run is an error, not a silent
mismatch.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from .columns import eval_columns
from .metrics_io import MetricsError

Correctness = dict[str, NDArray[np.bool_]]   # table column -> (N,) right on example n
_SWEEP_PREFIX = "pgd_eps_"                    # eps-sweep steps: not part of any table metric


def record_path(record_dir: Path, model: str) -> Path:
    return record_dir / f"{model}_record.csv"


def _step_metric(step: str) -> str:
    return step.split("/", 1)[0]


def correctness_from_csv(path: Path, cascade: bool = False) -> Correctness:
    """{column: (N,) bool} for clean, every attack metric in the record and worst_case."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise MetricsError(f"cannot read per-example record {path}: {exc}") from None
    if not rows or "clean_correct" not in rows[0] or "robust" not in rows[0]:
        raise MetricsError(f"{path}: not an evaluation record (needs clean_correct and robust columns)")
    header, body = rows[0], rows[1:]
    col = {name: j for j, name in enumerate(header)}
    clean = np.array([r[col["clean_correct"]] == "1" for r in body], dtype=bool)
    steps = [h for h in header[header.index("clean_correct") + 1:header.index("robust")]]
    broken = np.array([[r[col[s]] == "1" for s in steps] for r in body], dtype=bool).reshape(len(body), len(steps))
    out: Correctness = {"clean": clean, "worst_case": np.array([r[col["robust"]] == "1" for r in body], dtype=bool)}
    worst = [j for j, s in enumerate(steps) if not s.startswith(_SWEEP_PREFIX)]
    for metric in dict.fromkeys(_step_metric(s) for s in steps if not s.startswith(_SWEEP_PREFIX)):
        own = [j for j, s in enumerate(steps) if _step_metric(s) == metric]
        cols = [j for j in worst if j <= own[-1]] if cascade else own
        out[metric] = clean & ~broken[:, cols].any(1)
    return out


def load_correctness(models: Sequence[str], record_dir: Path, accuracies: Mapping[str, Mapping[str, float]],
                     cascade: Mapping[str, bool] | None = None) -> dict[str, Correctness]:
    """Per-example correctness of every model whose record exists, checked against its accuracies
    (percent, table columns; 1e-3 points of slack for rounded summaries). Models without a record are left out (no paired statistics for them)."""
    out: dict[str, Correctness] = {}
    checked = eval_columns()
    for m in models:
        path = record_path(record_dir, m)
        if not path.is_file():
            continue
        c = correctness_from_csv(path, bool((cascade or {}).get(m, False)))
        for key, acc in accuracies.get(m, {}).items():
            if key in c and key in checked and abs(100.0 * c[key].mean() - acc) > 1e-3:
                raise MetricsError(f"{path}: {key} accuracy from the record is {100.0 * c[key].mean():.2f} % but the "
                                   f"metrics JSON says {acc:.2f} %: the record belongs to another run")
        out[m] = c
    lengths = {m: len(c["clean"]) for m, c in out.items()}
    if len(set(lengths.values())) > 1:
        raise MetricsError(f"per-example records differ in length (test examples per model: {lengths}); "
                           f"paired comparisons need every model on the same examples")
    return out
