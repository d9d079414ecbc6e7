"""The metric-regression gate: current aggregate metrics against a committed baseline.

Both sides are the aggregate stage's summary JSON
    {"models": {model: {metric: value}}, "sweeps": {objective: {"mean_gap": value}}, "context": {...}}
(or, for the current side, the summary CSV). A baseline is a copy of a summary from a
trusted run of the same profile, plus (written with the run's records, `arpipe gate
--update --records metrics/eval_detail`) every model's per-example correctness:
    "examples": {model: {metric: {"n": N, "bits": hex}}}   bit i = example i right
Accuracies with examples on both sides are gated paired, as the noise of a finite test set
demands: regressed = dropped by more than gate.min_effect points AND the paired bootstrap
interval of (current - baseline) over the same examples excludes zero, at level
1 - alpha / (number of paired checks) (Bonferroni: alpha bounds the chance that an
unchanged pipeline raises any alarm). Every other (model, metric) in the baseline is checked
with the rule params give that metric (GateParams): moved the wrong way beyond tolerance ->
regressed; absent now -> missing (both fail); moved the good way beyond tolerance (or
significantly, for paired checks) -> improved (passes, hints to refresh the baseline).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from rich.table import Table

from ..io import write_json
from ..stats import paired_comparison
from .columns import by_key, numeric_columns
from .config import GateParams
from .metrics_io import MetricsError
from .records import Correctness, load_correctness
from ..errors import UserError

Status = Literal["ok", "improved", "regressed", "missing", "new", "ignored"]
FAILING: frozenset[str] = frozenset({"regressed", "missing"})
# Context keys that must agree: comparing a 100-image baseline with a 500-image run
# (or PGD against AutoAttack numbers) would be a wrong-baseline error, not a regression.
CONTEXT_KEYS = ("dataset", "arch", "eps", "n_eval", "pgd_steps", "cascade", "robust_metric", "reference")
GATE_BOOT = 20_000   # resamples: the Bonferroni-corrected tails (~0.2 % each) need many
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
    allowed: float | None  # largest tolerated move against `direction` (paired: the minimum effect)
    direction: str
    status: Status
    interval: tuple[float, float] | None = None   # paired: bootstrap interval of current - baseline, points

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
        cols = [c for c in numeric_columns() if c in frame.columns]
        models = {str(r["model"]): {c: float(r[c]) for c in cols if pd.notna(r[c])} for _, r in frame.iterrows()}
        return {"models": models, "sweeps": {}, "context": {}, "examples": {}}
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as exc:
        raise GateInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "models" not in doc:
        raise GateInputError(f"{path}: not an aggregate summary (expected a 'models' key)")
    return {"models": _numeric_block(path, doc["models"], "models"),
            "sweeps": _numeric_block(path, doc.get("sweeps", {}), "sweeps"),
            "context": doc.get("context", {}) if isinstance(doc.get("context", {}), dict) else {},
            "examples": _examples_block(path, doc.get("examples", {})),
            **({"seed_std": _numeric_block(path, doc["seed_std"], "seed_std"), "seeds": doc.get("seeds", [])}
               if "seed_std" in doc else {})}


def encode_bits(correct: NDArray[np.bool_]) -> str:
    """(N,) bool -> hex string, bit i (MSB first) = example i right."""
    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def decode_bits(bits: str, n: int) -> NDArray[np.bool_]:
    return np.unpackbits(np.frombuffer(bytes.fromhex(bits), dtype=np.uint8), count=n).astype(bool)


def _examples_block(path: Path, block: Any) -> dict[str, Correctness]:
    if not isinstance(block, dict):
        raise GateInputError(f"{path}: 'examples' must map models to {{metric: {{n, bits}}}}")
    out: dict[str, Correctness] = {}
    for model, metrics in block.items():
        out[model] = {}
        for metric, enc in (metrics or {}).items():
            try:
                n = int(enc["n"])
                out[model][metric] = decode_bits(str(enc["bits"]), n)
                if len(enc["bits"]) != 2 * ((n + 7) // 8):
                    raise ValueError(f"{len(enc['bits'])} hex digits for n={n}")
            except (KeyError, TypeError, ValueError) as exc:
                raise GateInputError(f"{path}: examples.{model}.{metric} is not {{n, bits}} ({exc})") from None
    return out


def examples_block(correct: dict[str, Correctness], robust_metric: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """Per-example correctness as the baseline stores it; `robust` is each model's robust-metric column
    (robust_metric: the summary context's value, one name or {model: name})."""
    out = {}
    for model, cols in correct.items():
        metric = robust_metric.get(model) if isinstance(robust_metric, dict) else robust_metric
        cols = {**cols, **({"robust": cols[metric]} if metric in cols else {})}
        out[model] = {k: {"n": int(v.size), "bits": encode_bits(v)} for k, v in cols.items()}
    return out


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


def _paired_keys(baseline: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, str]]:
    """(model, metric) with per-example correctness on both sides, over the same number of examples."""
    be, ce = baseline.get("examples", {}), current.get("examples", {})
    return [(m, k) for m, cols in be.items() for k, v in cols.items()
            if k in ce.get(m, {}) and ce[m][k].size == v.size and gate_direction(k) == "higher"]


def gate_direction(metric: str) -> str:
    """The declared direction of a metric with a per-example record (columns.py), else 'none' (gated by its rule)."""
    spec = by_key().get(metric)
    return spec.direction if spec is not None and spec.per_example else "none"


def seed_sd(baseline: dict[str, Any], entity: str, metric: str) -> float:
    """The baseline's std of (entity, metric) over training seeds (0 without replicates), in points."""
    sd = baseline.get("seed_std", {}).get(entity, {}).get(metric, 0.0)
    return float(sd) if isinstance(sd, int | float) and math.isfinite(sd) else 0.0


def _paired_row(entity: str, metric: str, b: float | None, c: float | None, base: NDArray[np.bool_],
                cur: NDArray[np.bool_], gate: GateParams, checks: int, seed_std: float = 0.0) -> GateRow:
    r = paired_comparison(cur, base, level=1.0 - gate.alpha / checks, n_boot=GATE_BOOT)
    diff, lo, hi = 100.0 * r.diff, 100.0 * r.lo, 100.0 * r.hi
    effect = max(gate.min_effect, gate.seed_sd_factor * seed_std)   # points: test-set noise AND seed noise
    status: Status = ("regressed" if hi < 0 and -diff > effect + _EPS else
                      "improved" if lo > 0 and diff > effect + _EPS else "ok")
    return GateRow(entity, metric, b, c, effect, "higher", status, (lo, hi))


def compare(baseline: dict[str, Any], current: dict[str, Any], gate: GateParams) -> list[GateRow]:
    """One GateRow per (entity, metric) in either file, baseline order first; paired where both sides
    hold the examples (see the module docstring)."""
    base, cur = _flat(baseline), _flat(current)
    paired = _paired_keys(baseline, current)
    rows = []
    for key in [*base, *(k for k in cur if k not in base)]:
        entity, metric = key
        rule = gate.rule(metric)
        b, c = base.get(key), cur.get(key)
        if key in paired and c is not None:
            rows.append(_paired_row(entity, metric, b, c, baseline["examples"][entity][metric],
                                    current["examples"][entity][metric], gate, len(paired),
                                    seed_sd(baseline, entity, metric)))
            continue
        allowed = None if b is None else max(rule.allowed(b), gate.seed_sd_factor * seed_sd(baseline, entity, metric))
        direction = rule.direction_of(metric)
        status: Status
        if direction == "ignore":
            status = "ignored"
        elif b is None:
            status = "new"
        elif c is None:
            status = "missing"
        else:
            gain = (c - b) if direction == "higher" else (b - c)   # > 0 = better
            assert allowed is not None
            status = "regressed" if gain < -allowed - _EPS else "improved" if gain > allowed + _EPS else "ok"
        rows.append(GateRow(entity, metric, b, c, allowed, direction, status))
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
        if r.interval is not None:   # paired: fails only when the interval excludes 0 and the drop > min effect
            tol = f"paired CI [{r.interval[0]:+.1f}, {r.interval[1]:+.1f}], min {r.allowed:.1f}"
        table.add_row(r.entity, r.metric, num(r.baseline), num(r.current), num(r.delta, signed=True), tol,
                      f"[{_STYLE[r.status]}]{r.status.upper() if r.status in FAILING else r.status}[/]")
    return table


def write_baseline(current: dict[str, Any], path: Path, profile: str | None, source: Path,
                   correct: dict[str, Correctness] | None = None) -> None:
    """Install `current` as the committed baseline (the aggregate summary's format), with the per-example
    correctness `correct` (from the run's records) that the paired checks need."""
    doc = {k: v for k, v in current.items() if k != "examples"}
    doc["baseline"] = {"profile": profile, "from": str(source)}
    if correct:
        doc["examples"] = examples_block(correct, current["context"].get("robust_metric"))
    write_json(path, doc)


def current_examples(current: dict[str, Any], record_dir: Path) -> dict[str, Correctness]:
    """Per-example correctness of the current run's models from their records, checked against the summary;
    `robust` added as each model's robust-metric column."""
    cascade = current["context"].get("cascade", False)
    try:
        correct = load_correctness(list(current["models"]), record_dir, current["models"],
                                   cascade if isinstance(cascade, dict) else dict.fromkeys(current["models"], cascade))
    except MetricsError as exc:
        raise GateInputError(str(exc)) from None
    robust = current["context"].get("robust_metric")
    for model, cols in correct.items():
        metric = robust.get(model) if isinstance(robust, dict) else robust
        if metric in cols:
            cols["robust"] = cols[metric]
    return correct
