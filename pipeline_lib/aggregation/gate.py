"""The metric-regression gate: current aggregate metrics against a committed baseline.

Both sides are the aggregate stage's summary JSON
    {"models": {model: {metric: value}}, "sweeps": {objective: {"mean_gap": value}}, "context": {...}}
(or, for the current side, the summary CSV). A baseline is just a copy of a
summary from a trusted run of the same profile. Every (model, metric) present in
the baseline is checked with the rule params give that metric (GateParams):
moved the wrong way beyond tolerance -> regressed; absent now -> missing (both fail);
moved the good way beyond tolerance -> improved (passes, hints to refresh the baseline).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from rich.table import Table

from ..io import write_json
from .config import GateParams
from .summary import NUMERIC_COLUMNS
from ..errors import UserError

Status = Literal["ok", "improved", "regressed", "missing", "new", "ignored"]
FAILING: frozenset[str] = frozenset({"regressed", "missing"})
# Context keys that must agree: comparing a 100-image baseline with a 500-image run
# (or PGD against AutoAttack numbers) would be a wrong-baseline error, not a regression.
CONTEXT_KEYS = ("dataset", "arch", "eps", "n_eval", "pgd_steps", "robust_metric", "reference")
SWEEP_SUFFIX = " (sweep)"
_EPS = 1e-9   # float slack so a move of exactly the tolerance passes
_SHOWN = 5e-4  # smallest move listed without --all: what the table's 3 decimals can show


class GateInputError(UserError, ValueError):
    """A metrics file the gate cannot use (missing, malformed, or from a different setup)."""


@dataclass(frozen=True)
class GateRow:
    entity: str            # model name, or "<objective> (sweep)"
    metric: str
    baseline: float | None
    current: float | None
    allowed: float | None  # largest tolerated move against `direction`
    direction: str
    status: Status

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None or self.current is None else self.current - self.baseline


def _numeric_block(path: Path, block: Any, what: str) -> dict[str, dict[str, float]]:
    if not isinstance(block, dict) or not all(isinstance(v, dict) for v in block.values()):
        raise GateInputError(f"{path}: '{what}' must map names to {{metric: value}} objects")
    out: dict[str, dict[str, float]] = {}
    for name, metrics in block.items():
        out[name] = {}
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise GateInputError(f"{path}: {what}.{name}.{metric}={value!r} is not a finite number")
            out[name][metric] = float(value)
    return out


def load_metrics(path: Path) -> dict[str, Any]:
    """A summary JSON, or a summary CSV (models only, no context), as {"models", "sweeps", "context"}."""
    if not path.is_file():
        raise GateInputError(f"metrics file {path} does not exist")
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
        if "model" not in frame.columns:
            raise GateInputError(f"{path}: a summary CSV needs a 'model' column; got {list(frame.columns)}")
        cols = [c for c in NUMERIC_COLUMNS if c in frame.columns]
        models = {str(r["model"]): {c: float(r[c]) for c in cols if pd.notna(r[c])} for _, r in frame.iterrows()}
        return {"models": models, "sweeps": {}, "context": {}}
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as exc:
        raise GateInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "models" not in doc:
        raise GateInputError(f"{path}: not an aggregate summary (expected a 'models' key)")
    return {"models": _numeric_block(path, doc["models"], "models"),
            "sweeps": _numeric_block(path, doc.get("sweeps", {}), "sweeps"),
            "context": doc.get("context", {}) if isinstance(doc.get("context", {}), dict) else {}}


def _flat(doc: dict[str, Any]) -> dict[tuple[str, str], float]:
    out = {(m, k): v for m, metrics in doc["models"].items() for k, v in metrics.items()}
    out.update({(o + SWEEP_SUFFIX, k): v for o, metrics in doc["sweeps"].items() for k, v in metrics.items()})
    return out


def check_context(baseline: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise GateInputError when both sides state a setup key and disagree (the wrong baseline)."""
    b, c = baseline["context"], current["context"]
    diffs = [f"{k}: baseline {b[k]!r}, current {c[k]!r}" for k in CONTEXT_KEYS
             if k in b and k in c and b[k] != c[k]]
    if diffs:
        raise GateInputError("baseline and current metrics come from different setups (" + "; ".join(diffs) +
                             "): compare against the baseline of this profile, or refresh it if the change is "
                             "intended")


def compare(baseline: dict[str, Any], current: dict[str, Any], gate: GateParams) -> list[GateRow]:
    """One GateRow per (entity, metric) in either file, baseline order first."""
    base, cur = _flat(baseline), _flat(current)
    rows = []
    for key in [*base, *(k for k in cur if k not in base)]:
        entity, metric = key
        rule = gate.rule(metric)
        b, c = base.get(key), cur.get(key)
        allowed = None if b is None else rule.allowed(b)
        status: Status
        if rule.direction == "ignore":
            status = "ignored"
        elif b is None:
            status = "new"
        elif c is None:
            status = "missing"
        else:
            gain = (c - b) if rule.direction == "higher" else (b - c)   # > 0 = better
            assert allowed is not None
            status = "regressed" if gain < -allowed - _EPS else "improved" if gain > allowed + _EPS else "ok"
        rows.append(GateRow(entity, metric, b, c, allowed, rule.direction, status))
    return rows


def failed(rows: list[GateRow]) -> bool:
    return any(r.status in FAILING for r in rows)


_STYLE = {"ok": "green", "improved": "bold cyan", "regressed": "bold red", "missing": "bold red",
          "new": "yellow", "ignored": "dim"}


def render(rows: list[GateRow], show_all: bool = False) -> Table:
    """A rich table of what moved (every row with show_all)."""
    table = Table(title="metric-regression gate", show_lines=False)
    for col, justify in (("model", "left"), ("metric", "left"), ("baseline", "right"), ("current", "right"),
                         ("delta", "right"), ("tolerance", "right"), ("status", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]

    def num(v: float | None, signed: bool = False) -> str:
        return "–" if v is None else f"{v:+.3f}" if signed else f"{v:.3f}"

    for r in rows:
        if not show_all and r.status in ("ok", "ignored") and (r.delta is None or abs(r.delta) < _SHOWN):
            continue
        move = {"higher": "drop", "lower": "rise"}.get(r.direction)
        tol = "–" if r.allowed is None or move is None else f"{move} ≤ {r.allowed:.3f}"
        table.add_row(r.entity, r.metric, num(r.baseline), num(r.current), num(r.delta, signed=True), tol,
                      f"[{_STYLE[r.status]}]{r.status.upper() if r.status in FAILING else r.status}[/]")
    return table


def write_baseline(current: dict[str, Any], path: Path, profile: str | None, source: Path) -> None:
    """Install `current` as the committed baseline (same format as the aggregate summary)."""
    doc = {**current, "baseline": {"profile": profile, "from": str(source)}}
    write_json(path, doc)
