"""Collect each model's metrics from the per-stage JSON files the pipeline writes.

Per model M (file names from the stages' contracts; the folders come from dvc.yaml):
    <eval_dir>/M.json        <key>_acc of every metric the evaluation registry declares: clean_acc, one
                             per registered attack (fgsm_acc, pgd_acc, ...), worst_case_acc
                             (fractions; an attack that was not run is absent), pgd_steps, n_eval, eps
    <train_dir>/M.json       train_time_s, ...                                  (optional)
    <corruption_dir>/M.json  mean_corruption_acc (fraction), table (per corruption and severity)
                                                                                 (optional)
The evaluation file is required; the others are blanks when absent.
Accuracies are converted to percent here, once: everything downstream is in points.
Their declared roles are checked on reading: no attack accuracy above the clean one, no
worst case above any attack's (each counts a subset of the examples the other counts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import read_json
from ..errors import UserError
from ..evaluation.metric_spec import MetricSpec
from ..evaluation.registry import eval_metrics
from ..stats import accuracy_interval

CORRUPTION_KEY = "mean_corruption_acc"
TRAIN_TIME_KEY = "train_time_s"


class MetricsError(UserError, ValueError):
    """A metrics file is missing, unreadable or holds an impossible value (named in the message)."""


@dataclass(frozen=True)
class ModelMetrics:
    name: str
    objective: str                                        # finetune objective; sweeps group by it
    acc: dict[str, float] = field(default_factory=dict)   # evaluate-stage columns present (key), in percent
    corruption: float | None = None                       # mean corruption accuracy, percent
    # the corruption stage's whole metrics dict (per-corruption table), for errors relative to standard
    corruption_detail: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    train_time_s: float | None = None
    pgd_steps: int | None = None
    n_eval: int | None = None
    eps: float | None = None
    cascade: bool = False
    # 95 % bounds in percent per column: Wilson for the evaluate-stage accuracies (from n_eval), the corruption
    # stage's own bootstrap bounds for `corruption` (absent in metrics written before intervals existed)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except json.JSONDecodeError as exc:
        raise MetricsError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MetricsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _fraction(path: Path, data: Mapping[str, Any], key: str) -> float | None:
    """data[key] as percent, None when absent; a non-number or a value outside [0, 1] is an error."""
    if key not in data or data[key] is None:
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MetricsError(f"{path}: {key}={value!r} is not a finite number")
    if not 0.0 <= value <= 1.0:
        raise MetricsError(f"{path}: {key}={value!r} is not an accuracy fraction in [0, 1]")
    return 100.0 * float(value)


def _number(path: Path, data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MetricsError(f"{path}: {key}={value!r} is not a finite number")
    return float(value)


_SLACK = 1e-6   # fractions: equal counts written by different float paths


def check_roles(path: Path, specs: Sequence[MetricSpec], acc: Mapping[str, float]) -> None:
    """An attack accuracy above the clean one, or a worst case above an attack's, cannot come from one
    evaluation (acc: key -> percent): the file is corrupt or stitched together."""
    roles = {m.key: m.role for m in specs}
    attacks = [k for k in acc if roles.get(k) == "attack"]
    worst = [k for k in acc if roles.get(k) == "worst_case"]
    pairs = [(k, "clean") for k in (*attacks, *worst)] + [(k, a) for k in worst for a in attacks]
    for low, high in pairs:
        if high in acc and acc[low] > acc[high] + 100.0 * _SLACK:
            raise MetricsError(f"{path}: {low}_acc={acc[low] / 100:g} exceeds {high}_acc={acc[high] / 100:g}, "
                               f"which one evaluation cannot give")


def load_model_metrics(name: str, objective: str, eval_dir: Path, train_dir: Path | None = None,
                       corruption_dir: Path | None = None) -> ModelMetrics:
    eval_path = eval_dir / f"{name}.json"
    if not eval_path.is_file():
        raise MetricsError(f"no evaluation metrics for model {name!r}: {eval_path} does not exist "
                           f"(did evaluate@{name} run?)")
    ev = _read(eval_path)
    specs = eval_metrics()
    acc = {m.key: v for m in specs if (v := _fraction(eval_path, ev, m.eval_key)) is not None}
    if "clean" not in acc:
        raise MetricsError(f"{eval_path}: no clean_acc; keys present: {', '.join(sorted(ev)) or 'none'}")
    check_roles(eval_path, specs, acc)

    train_time = None
    if train_dir is not None and (train_path := train_dir / f"{name}.json").is_file():
        train_time = _number(train_path, _read(train_path), TRAIN_TIME_KEY)
    corruption = detail = None
    if corruption_dir is not None and (c_path := corruption_dir / f"{name}.json").is_file():
        detail = _read(c_path)
        corruption = _fraction(c_path, detail, CORRUPTION_KEY)

    steps, n_eval, eps = (_number(eval_path, ev, k) for k in ("pgd_steps", "n_eval", "eps"))
    ci: dict[str, tuple[float, float]] = {}
    wilson = {m.key for m in specs if m.interval == "wilson"}
    if n_eval:
        ci = {col: tuple(100.0 * b for b in accuracy_interval(v / 100.0, int(n_eval)))  # type: ignore[misc]
              for col, v in acc.items() if col in wilson}
    bounds = (detail or {}).get("ci95", {}).get(CORRUPTION_KEY)
    if corruption is not None and isinstance(bounds, dict) and {"lo", "hi"} <= set(bounds):
        ci["corruption"] = (100.0 * float(bounds["lo"]), 100.0 * float(bounds["hi"]))
    return ModelMetrics(name=name, objective=objective, acc=acc, corruption=corruption, corruption_detail=detail,
                        train_time_s=train_time,
                        pgd_steps=None if steps is None else int(steps),
                        n_eval=None if n_eval is None else int(n_eval), eps=eps,
                        cascade=bool(ev.get("cascade", False)), ci=ci)


def collect_metrics(models: Sequence[str], objectives: Mapping[str, str], eval_dir: Path,
                    train_dir: Path | None = None, corruption_dir: Path | None = None) -> list[ModelMetrics]:
    """Metrics of every model in `models` (in that order). objectives[name] defaults to the name."""
    if not models:
        raise MetricsError("no models to aggregate")
    if len(set(models)) != len(models):
        raise MetricsError(f"duplicate model names: {list(models)}")
    if not eval_dir.is_dir():
        raise MetricsError(f"evaluation metrics folder {eval_dir} does not exist")
    return [load_model_metrics(m, objectives.get(m, m), eval_dir, train_dir, corruption_dir) for m in models]
