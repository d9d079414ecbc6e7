"""A metric is declared once: an attack registered with its MetricSpec reaches the sanity flags, the
aggregate's table (CSV, Markdown, JSON), the params and the gate with no edit to aggregation code;
and contract tests over every declared metric.

The dummy attack (`shift`) is registered for one test by `registered_attack`; its models are really
evaluated (`evaluate_model`, the evaluate stage's own function) and their metrics JSON and
per-example record written in the stage's format, then `arpipe aggregate` and `arpipe gate` run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from torch import Tensor, nn
from typer.testing import CliRunner

from eval_support import eval_params, steps_for
from pipeline_lib.aggregation.columns import by_key, model_columns
from pipeline_lib.aggregation.config import AggregateParams, GateParams
from pipeline_lib.aggregation.gate import compare, failed
from pipeline_lib.aggregation.metrics_io import MetricsError, load_model_metrics
from pipeline_lib.aggregation.rows import ModelRow, Summary
from pipeline_lib.aggregation.table import csv_columns, markdown
from pipeline_lib.evaluation.benchmark import evaluate_model
from pipeline_lib.evaluation.metric_spec import AtMost, MetricSpec
from pipeline_lib.evaluation.record_metrics import worst_case_columns
from pipeline_lib.evaluation.registry import (EVAL_ATTACKS, AttackEnv, AttackStep, attack_metrics, eval_metrics,
                                              registered_attack)
from pipeline_lib.evaluation.sanity import check_attack_order
from pipeline_lib.io import write_json
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

EPS = 0.3
N = 200
STRENGTH = {"value": 0.0}   # the dummy attack's step along the gradient sign, in units of eps (set per run)
SHIFT = MetricSpec("shift", "Shift", role="attack", robust=True,
                   at_most=(AtMost("fgsm", "shift_weaker_than_fgsm", "a dummy declared stronger than FGSM"),))


def _shift(e: Any, env: AttackEnv) -> list[AttackStep]:
    """x + strength * eps * sign(grad of the loss): strength 0 leaves the images alone, 1 is FGSM."""
    strength = STRENGTH["value"]

    def run(x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        x = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(env.model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
        return (x + strength * env.eps * grad.sign()).clamp(0, 1).detach()

    return [AttackStep("shift", "shift_acc", env.eps, run)]


@pytest.fixture
def shift_attack() -> Iterator[MetricSpec]:
    with registered_attack("shift", SHIFT, _shift):
        yield SHIFT
    assert "shift" not in EVAL_ATTACKS


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).eval()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, 3, 4, 4, generator=g), torch.randint(0, 3, (N,), generator=g)


def _evaluate_into(d: Path, strength: float) -> dict[str, dict[str, Any]]:
    """Evaluate two models with FGSM and the dummy attack at `strength`; write <d>/eval/<m>.json and
    <d>/records/<m>_record.csv as the evaluate stage does. Returns the metrics dicts."""
    STRENGTH["value"] = strength
    x, y = _data()
    e = eval_params(attacks=["fgsm", "shift"], n_eval=N, batch_size=N)
    out = {}
    for name, seed in (("standard", 1), ("pgd_at", 2)):
        ev = evaluate_model(_model(seed), x, y, e, eps=EPS, num_classes=3, device=torch.device("cpu"))
        write_json(d / "eval" / f"{name}.json", ev.metrics)
        ev.record.write_csv(d / "records" / f"{name}_record.csv", worst_case_columns(ev.steps))
        out[name] = ev.metrics
    return out


def _params(d: Path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["evaluate"]["models"] = ["standard", "pgd_at"]
    raw["evaluate"]["attacks"] = ["fgsm", "shift"]
    raw["aggregate"]["robust_metric"] = "shift"   # a declared robust metric: the params accept it
    raw["aggregate"]["robust_fallback"] = []
    path = d / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _aggregate(d: Path, params: Path) -> Path:
    out = d / "out"
    result = runner.invoke(app, [
        "aggregate", "--eval-dir", str(d / "eval"), "--record-dir", str(d / "records"),
        "--table", str(out / "summary.csv"), "--markdown", str(out / "summary.md"),
        "--summary", str(out / "summary.json"), "--plot", str(out / "tradeoff.png"), "--params", str(params)])
    assert result.exit_code == 0, result.output
    return out


def test_a_registered_attack_reaches_the_flags_the_table_and_the_gate(tmp_path: Path, shift_attack: MetricSpec) -> None:
    base = tmp_path / "base"
    metrics = _evaluate_into(base, strength=0.0)
    # its declared ordering is a sanity flag: left alone, the images keep clean accuracy > FGSM's
    assert metrics["pgd_at"]["shift_acc"] == metrics["pgd_at"]["clean_acc"] > metrics["pgd_at"]["fgsm_acc"]
    assert metrics["pgd_at"]["flags"]["shift_weaker_than_fgsm"] is True
    assert any(w.startswith("Shift accuracy") for w in metrics["pgd_at"]["warnings"])
    params = _params(base)
    out = _aggregate(base, params)

    table = pd.read_csv(out / "summary.csv").set_index("model")
    assert {"shift", "shift_lo", "shift_hi"} <= set(table.columns)
    assert table.loc["pgd_at", "shift"] == pytest.approx(100 * metrics["pgd_at"]["shift_acc"])
    assert table.loc["pgd_at", "robust"] == table.loc["pgd_at", "shift"]          # chosen as the robust metric
    assert table.loc["pgd_at", "shift_lo"] < table.loc["pgd_at", "shift"] < table.loc["pgd_at", "shift_hi"]
    header = next(line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| Model"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    # registered last: after the built-in attacks, before the worst case over all of them
    assert cells.index("Shift") == cells.index("AutoAttack") + 1 == cells.index("Worst case") - 1
    assert cells[-1] == "Robust metric"
    assert "- **Robust accuracy** for ARDist and the tradeoff plot: Shift." in (out / "summary.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["pgd_at"]["shift"] == pytest.approx(100 * metrics["pgd_at"]["shift_acc"])

    baseline = tmp_path / "baseline.json"
    gate = ["gate", "--baseline", str(baseline), "--params", str(params), "--all"]
    result = runner.invoke(app, [*gate, "--update", "--current", str(out / "summary.json"),
                                 "--records", str(base / "records")])
    assert result.exit_code == 0, result.output
    assert "shift" in json.loads(baseline.read_text())["examples"]["pgd_at"]

    # the same run passes; a run where the attack breaks what it used to leave fails on its column, paired
    result = runner.invoke(app, [*gate, "--current", str(out / "summary.json"), "--records", str(base / "records")])
    assert result.exit_code == 0, result.output
    cur = tmp_path / "cur"
    stronger = _evaluate_into(cur, strength=1.0)
    assert stronger["pgd_at"]["shift_acc"] < metrics["pgd_at"]["shift_acc"] - 0.05
    assert stronger["pgd_at"]["flags"]["shift_weaker_than_fgsm"] is False
    out = _aggregate(cur, params)
    result = runner.invoke(app, [*gate, "--current", str(out / "summary.json"), "--records", str(cur / "records")])
    assert result.exit_code == 1, result.output
    regressed = {line.split("│")[2].strip() for line in result.output.splitlines() if "REGRESSED" in line}
    assert "shift" in regressed and all("paired CI" in line for line in result.output.splitlines()
                                        if "REGRESSED" in line)


def test_the_column_leaves_with_the_registration(tmp_path: Path) -> None:
    assert "shift" not in [m.key for m in model_columns()]
    with pytest.raises(ValueError, match="cannot be the robust metric"):
        AggregateParams(robust_metric="shift")
    with pytest.raises(ValueError, match="unknown metric"):
        GateParams.model_validate({"metrics": {"shift": {"abs_tol": 1.0}}})
    with registered_attack("shift", SHIFT, _shift):
        assert AggregateParams(robust_metric="shift").robust_metric == "shift"
        assert GateParams.model_validate({"metrics": {"shift": {"abs_tol": 1.0}}}).rule("shift").abs_tol == 1.0
        assert "shift_hi" in csv_columns()
    assert "shift_hi" not in csv_columns()


def test_an_attack_must_declare_its_own_column() -> None:
    with pytest.raises(ValueError, match="key 'shift'"):
        with registered_attack("shift", MetricSpec("other", "Other", role="attack"), _shift):
            pass
    with pytest.raises(ValueError, match="role 'attack'"):
        with registered_attack("shift", MetricSpec("shift", "Shift"), _shift):
            pass
    assert "shift" not in EVAL_ATTACKS


# ---- contracts, over every declared metric ------------------------------------------------------------------

ALL = sorted(by_key())
ATTACKS = [m.key for m in attack_metrics()]
ORDERINGS = [(m.key, i) for m in attack_metrics() for i in range(len(m.at_most))]


def test_keys_and_labels_are_unique_and_columns_ordered() -> None:
    cols = model_columns()
    assert len({m.key for m in cols}) == len(cols) and len({m.label for m in cols}) == len(cols)
    keys = [m.key for m in eval_metrics()]
    assert keys[0] == "clean" and keys[-1] == "worst_case" and keys[1:-1] == EVAL_ATTACKS.in_order()


@pytest.mark.parametrize("key", ATTACKS)
def test_an_attacks_steps_count_towards_its_declared_column(tiny_model: nn.Module, key: str) -> None:
    """The record's step names are how the aggregate rebuilds a column per example: <key> or <key>/<part>."""
    spec = by_key()[key]
    steps = steps_for(tiny_model.eval(), eval_params(attacks=[key]), 0.1)
    assert steps and all(st.metric == spec.eval_key and st.name.split("/", 1)[0] == key for st in steps)


@pytest.mark.parametrize(("key", "i"), ORDERINGS)
def test_every_declared_ordering_raises_its_flag_when_broken(key: str, i: int) -> None:
    spec = by_key()[key]
    rule = spec.at_most[i]
    assert rule.weaker in ATTACKS
    honest = {k: 0.5 for k in ATTACKS}
    assert check_attack_order(honest, tol=0.01).flags[rule.flag] is False
    report = check_attack_order({**honest, key: 0.6}, tol=0.01)
    assert report.flags[rule.flag] is True
    assert any(m.startswith(f"{spec.label} accuracy 0.6000 > {by_key()[rule.weaker].label} accuracy 0.5000")
               and m.endswith(rule.why) for m in report.messages)


@pytest.mark.parametrize("key", ALL)
def test_the_robust_metric_param_accepts_exactly_the_declared_robust_metrics(key: str) -> None:
    if by_key()[key].robust:
        assert AggregateParams(robust_metric=key, robust_fallback=[]).robust_order == [key]
    else:
        with pytest.raises(ValueError, match=f"'{key}' cannot be the robust metric"):
            AggregateParams(robust_metric=key)


@pytest.mark.parametrize("key", [m.key for m in model_columns()])
def test_every_column_is_in_the_csv_and_the_markdown_as_declared(key: str) -> None:
    spec = by_key()[key]
    values = {m.key: 12.345 for m in model_columns()}
    row = ModelRow("m", "m", "fgsm", values, ci={m.key: (10.0, 14.0) for m in model_columns() if m.interval != "none"})
    s = Summary(rows=[row], robust_metric="fgsm", reference_mode="own", reference_points=[], curve=None,
                curve_error="none", sweeps=[], context={"pgd_steps": 7})
    assert key in csv_columns() and (f"{key}_lo" in csv_columns()) == (spec.interval != "none")
    lines = markdown(s).splitlines()
    header = [c.strip() for c in next(x for x in lines if x.startswith("| Model")).strip("|").split("|")]
    body = [c.strip() for c in lines[lines.index(next(x for x in lines if x.startswith("| Model"))) + 2]
            .strip("|").split("|")]
    if not spec.in_markdown:
        assert spec.title(s.context) not in header
        return
    cell = body[header.index(spec.title(s.context))]
    number = f"{12.345:+.{spec.digits}f}" if spec.signed else f"{12.345:.{spec.digits}f}"
    assert cell == (f"{number} ±{2.0:.{spec.digits}f}" if spec.interval != "none" else number)


@pytest.mark.parametrize("key", ALL)
def test_the_gate_fails_a_move_against_the_declared_direction_only(key: str) -> None:
    spec = by_key()[key]
    worse = -10.0 if spec.direction == "higher" else 10.0
    block = "sweeps" if key == "mean_gap" else "models"

    def doc(value: float) -> dict[str, Any]:
        return {"models": {}, "sweeps": {}, "context": {}, block: {"m": {key: value}}}

    gate = GateParams.model_validate({"default": {"abs_tol": 5.0}, "metrics": {key: {"abs_tol": 5.0}}})
    assert failed(compare(doc(50.0), doc(50.0 + worse), gate))
    assert not failed(compare(doc(50.0), doc(50.0 - worse), gate))


@pytest.mark.parametrize("key", [m.key for m in eval_metrics() if m.role != "clean"])
def test_the_reader_refuses_an_accuracy_its_role_rules_out(tmp_path: Path, key: str) -> None:
    spec = by_key()[key]
    acc = {m.eval_key: 0.5 for m in eval_metrics()}
    (tmp_path / "m.json").write_text(json.dumps({**acc, "n_eval": 100}))
    assert load_model_metrics("m", "m", tmp_path).acc[key] == 50.0
    bad = {**acc, spec.eval_key: 0.6}   # above clean (an attack) or above every attack (the worst case)
    if spec.role == "attack":
        bad["worst_case_acc"] = 0.4
    (tmp_path / "m.json").write_text(json.dumps({**bad, "n_eval": 100}))
    with pytest.raises(MetricsError, match=f"{key}_acc=0.6 exceeds"):
        load_model_metrics("m", "m", tmp_path)
