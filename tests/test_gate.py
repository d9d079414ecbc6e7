"""`arpipe gate`: passes within tolerance, fails on a planted regression and on a missing metric,
exit 2 on bad input, and --update writes a baseline the gate then accepts."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from datafiles import arpipe_torch_probe
from typer.testing import CliRunner

from pipeline_lib.aggregation.config import GateParams, GateRule
from pipeline_lib.aggregation.gate import compare, failed
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]

runner = CliRunner()

BASELINE: dict[str, Any] = {
    "models": {
        "standard": {"clean": 87.0, "pgd": 0.0, "robust": 0.0, "ardist": 0.0, "train_time_s": 10.0},
        "pgd_at": {"clean": 78.0, "pgd": 57.0, "robust": 57.0, "nrr_cw": 60.0, "ardist": 0.0, "train_time_s": 30.0},
    },
    "sweeps": {"arrest": {"mean_gap": 1.5}},
    "context": {"dataset": "fashion_mnist", "arch": "small_cnn", "eps": 0.1, "n_eval": 100, "pgd_steps": 5,
                "robust_metric": "pgd", "reference": "own"},
}
# Tolerance used throughout: 3 points for accuracies, times not gated.
GATE = {"default": {"direction": "higher", "abs_tol": 3.0}, "metrics": {"train_time_s": {"direction": "ignore"}}}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["aggregate"] = {**raw.get("aggregate", {}), "gate": GATE}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(BASELINE))
    return {"params": params, "baseline": baseline, "current": tmp_path / "current.json"}


def run_gate(files: dict[str, Path], current: dict[str, Any] | None, *extra: str):
    if current is not None:
        files["current"].write_text(json.dumps(current))
    return runner.invoke(app, ["gate", "--baseline", str(files["baseline"]), "--current", str(files["current"]),
                               "--params", str(files["params"]), *extra])


def changed(**moves: float) -> dict[str, Any]:
    """BASELINE with 'model.metric' (or 'sweep.objective.metric') values replaced."""
    doc = copy.deepcopy(BASELINE)
    for key, value in moves.items():
        parts = key.split("__")
        block = doc["sweeps"] if parts[0] == "sweep" else doc["models"]
        name, metric = parts[-2], parts[-1]
        block[name][metric] = value
    return doc


def test_identical_metrics_pass(files) -> None:
    result = run_gate(files, BASELINE)
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output


def test_moves_within_tolerance_pass(files) -> None:
    # -2.9 points on clean, -3.0 exactly on pgd (the tolerance itself), train time x10 (ignored).
    result = run_gate(files, changed(pgd_at__clean=75.1, pgd_at__pgd=54.0, standard__train_time_s=100.0))
    assert result.exit_code == 0, result.output
    assert "REGRESSED" not in result.output


def test_planted_regression_fails(files) -> None:
    result = run_gate(files, changed(pgd_at__pgd=50.0))          # -7 points, tolerance 3
    assert result.exit_code == 1, result.output
    assert "REGRESSED" in result.output and "gate FAILED" in result.output
    assert "-7.000" in result.output


def test_sweep_gap_regression_fails(files) -> None:
    assert run_gate(files, changed(sweep__arrest__mean_gap=-2.0)).exit_code == 1


def test_missing_metric_fails(files) -> None:
    current = copy.deepcopy(BASELINE)
    del current["models"]["pgd_at"]["nrr_cw"]
    result = run_gate(files, current)
    assert result.exit_code == 1, result.output
    assert "MISSING" in result.output


def test_missing_model_fails(files) -> None:
    current = copy.deepcopy(BASELINE)
    del current["models"]["pgd_at"]
    assert run_gate(files, current).exit_code == 1


def test_improvement_passes_with_refresh_hint(files) -> None:
    result = run_gate(files, changed(pgd_at__pgd=65.0))
    assert result.exit_code == 0, result.output
    assert "improved" in result.output and "--update" in result.output


def test_new_metric_is_reported_not_failed(files) -> None:
    current = copy.deepcopy(BASELINE)
    current["models"]["pgd_at"]["autoattack"] = 40.0
    result = run_gate(files, current)
    assert result.exit_code == 0 and "new" in result.output


@pytest.mark.parametrize("case", ["no_baseline", "bad_json", "not_summary", "other_profile", "bad_value"])
def test_bad_input_exits_2(files, case: str) -> None:
    current: dict[str, Any] | None = BASELINE
    if case == "no_baseline":
        files["baseline"].unlink()
    elif case == "bad_json":
        files["current"].write_text("{not json")
        current = None
    elif case == "not_summary":
        current = {"clean_acc": 0.9}
    elif case == "other_profile":   # a 500-image run against the 100-image baseline: wrong baseline
        current = copy.deepcopy(BASELINE)
        current["context"]["n_eval"] = 500
    elif case == "bad_value":
        current = changed(pgd_at__clean="high")  # type: ignore[arg-type]
    result = run_gate(files, current)
    assert result.exit_code == 2, result.output


def test_update_writes_a_baseline_the_gate_accepts(files, tmp_path: Path) -> None:
    new_baseline = tmp_path / "baselines" / "ci.json"
    files["current"].write_text(json.dumps(changed(pgd_at__pgd=40.0)))
    result = runner.invoke(app, ["gate", "--update", "--profile", "ci", "--baseline", str(new_baseline),
                                 "--current", str(files["current"]), "--params", str(files["params"])])
    assert result.exit_code == 0, result.output
    written = json.loads(new_baseline.read_text())
    assert written["models"]["pgd_at"]["pgd"] == 40.0 and written["baseline"]["profile"] == "ci"
    # The old baseline would call this a regression; the refreshed one does not.
    assert run_gate(files, None).exit_code == 1
    files["baseline"] = new_baseline
    assert run_gate(files, None).exit_code == 0


def test_csv_current_is_accepted(files) -> None:
    csv = files["current"].with_suffix(".csv")
    csv.write_text("model,objective,clean,pgd,robust,ardist,nrr_cw,train_time_s,robust_metric\n"
                   "standard,standard,87.0,0.0,0.0,0.0,,10.0,pgd\n"
                   "pgd_at,pgd_at,78.0,50.0,50.0,0.0,60.0,30.0,pgd\n")
    files["current"] = csv
    # The CSV carries no sweeps: the arrest mean gap counts as missing, and pgd_at's pgd regressed.
    result = run_gate(files, None, "--all")
    assert result.exit_code == 1
    assert "MISSING" in result.output and "REGRESSED" in result.output


def test_lower_is_better_with_relative_tolerance() -> None:
    gate = GateParams(default=GateRule(abs_tol=1.0),
                      metrics={"train_time_s": GateRule(direction="lower", rel_tol=0.5)})
    base = {"models": {"m": {"train_time_s": 10.0, "clean": 80.0}}, "sweeps": {}}
    slower = {"models": {"m": {"train_time_s": 16.0, "clean": 80.0}}, "sweeps": {}}   # +60 % > 50 %
    ok = {"models": {"m": {"train_time_s": 14.0, "clean": 79.5}}, "sweeps": {}}       # +40 %, -0.5 points
    faster = {"models": {"m": {"train_time_s": 2.0, "clean": 80.0}}, "sweeps": {}}
    assert failed(compare(base, slower, gate))
    assert not failed(compare(base, ok, gate))
    statuses = {r.metric: r.status for r in compare(base, faster, gate)}
    assert statuses == {"train_time_s": "improved", "clean": "ok"}


def test_unknown_metric_in_gate_params_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        GateParams(metrics={"clean_acc": GateRule()})


def test_committed_ci_baseline_matches_the_ci_profile() -> None:
    """baselines/ci.json must be regenerated when the ci profile's models or evaluation change."""
    from pipeline_lib.aggregation.gate import load_metrics
    from pipeline_lib.config import parse_params
    from pipeline_lib.profiles import compose

    doc = load_metrics(REPO / "baselines" / "ci.json")
    p = parse_params(compose(yaml.safe_load((REPO / "params.yaml").read_text()), ["ci"], REPO / "conf" / "profile"))
    assert set(doc["models"]) == set(p.evaluate.models)
    assert doc["context"]["n_eval"] == p.evaluate.n_eval
    assert doc["context"]["pgd_steps"] == p.evaluate.pgd.steps
    assert doc["context"]["eps"] == p.threat.eps and doc["context"]["dataset"] == p.data.dataset


# ---- paired gating against the baseline's own per-example record --------------------------------------------

def _write_run(d: Path, correct: dict[str, tuple[Any, Any]]) -> Path:
    """A run's records (<model>_record.csv) and summary JSON from {model: ((N,) clean, (N,) autoattack)} bools."""
    import numpy as np
    (d / "records").mkdir(parents=True)
    models = {}
    for m, (clean, aa) in correct.items():
        aa = aa & clean
        lines = ["index,label,clean_pred,clean_correct,autoattack/apgd-ce,robust"]
        lines += [f"{i},0,{0 if c else 1},{int(c)},{('0' if a else '1') if c else ''},{int(a)}"
                  for i, (c, a) in enumerate(zip(clean, aa, strict=True))]
        (d / "records" / f"{m}_record.csv").write_text("\n".join(lines) + "\n")
        acc, rob = 100 * float(np.mean(clean)), 100 * float(np.mean(aa))
        models[m] = {"clean": acc, "autoattack": rob, "worst_case": rob, "robust": rob}
    summary = d / "summary.json"
    summary.write_text(json.dumps({"models": models, "sweeps": {}, "context": {
        "dataset": "fashion_mnist", "n_eval": len(clean), "robust_metric": "autoattack", "cascade": False}}))
    return summary


def _run(seed: int, n: int = 100) -> dict[str, tuple[Any, Any]]:
    import numpy as np
    rng = np.random.default_rng(seed)
    return {"standard": (rng.random(n) < 0.85, np.zeros(n, dtype=bool)),
            "pgd_at": (rng.random(n) < 0.75, rng.random(n) < 0.7)}


def _reseeded(run: dict[str, tuple[Any, Any]], flips: int, seed: int, up: int | None = None) -> dict[str, tuple[Any, Any]]:
    """Per column `flips` examples right->wrong and `up` (default as many) wrong->right: what a re-seeded
    run of unchanged code looks like on a fixed test set (many examples change, the accuracy barely)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = {}
    for m, cols in run.items():
        new = []
        for v in cols:
            v = v.copy()
            right, wrong = np.flatnonzero(v), np.flatnonzero(~v)
            k = min(flips, right.size, wrong.size)
            v[rng.choice(right, k, replace=False)] = False
            v[rng.choice(wrong, min(k if up is None else up, wrong.size), replace=False)] = True
            new.append(v)
        out[m] = (new[0], new[1])
    return out


@pytest.fixture
def paired(tmp_path: Path) -> dict[str, Path]:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    base_summary = _write_run(tmp_path / "base", _run(0))
    baseline = tmp_path / "baseline.json"
    result = runner.invoke(app, ["gate", "--update", "--profile", "ci", "--baseline", str(baseline), "--current",
                                 str(base_summary), "--records", str(tmp_path / "base" / "records"),
                                 "--params", str(params)])
    assert result.exit_code == 0, result.output
    return {"params": params, "baseline": baseline, "root": tmp_path}


def _gate_on(paired: dict[str, Path], run: dict[str, tuple[Any, Any]], name: str, *extra: str):
    summary = _write_run(paired["root"] / name, run)
    return runner.invoke(app, ["gate", "--baseline", str(paired["baseline"]), "--current", str(summary),
                               "--records", str(paired["root"] / name / "records"), "--params",
                               str(paired["params"]), "--all", *extra])


def test_baseline_stores_per_example_bits(paired) -> None:
    doc = json.loads(paired["baseline"].read_text())
    import numpy as np
    from pipeline_lib.aggregation.gate import decode_bits
    enc = doc["examples"]["pgd_at"]["clean"]
    assert enc["n"] == 100 and np.array_equal(decode_bits(enc["bits"], 100), _run(0)["pgd_at"][0])
    assert set(doc["examples"]["pgd_at"]) == {"clean", "autoattack", "worst_case", "robust"}


def test_reseeded_unchanged_run_passes_although_accuracies_move(paired) -> None:
    # 8 examples flip each way per column: accuracies equal, yet 16 % of examples changed. Then a noisy
    # 6-point drop (14 down, 8 up): the old fixed 5-point tolerance called that a regression.
    for i, run in enumerate([_reseeded(_run(0), 8, 1), _reseeded(_run(0), 14, 2, up=8)]):
        result = _gate_on(paired, run, f"reseeded{i}")
        assert result.exit_code == 0, result.output
        assert "paired CI" in result.output and "REGRESSED" not in result.output
    cur = json.loads((paired["root"] / "reseeded1" / "summary.json").read_text())["models"]["pgd_at"]["clean"]
    base = json.loads(paired["baseline"].read_text())["models"]["pgd_at"]["clean"]
    assert base - cur == pytest.approx(6.0)


def test_planted_regression_fails_the_paired_gate(paired) -> None:
    run = _run(0)
    clean, aa = run["pgd_at"]
    aa = aa & clean
    weaker = aa.copy()
    weaker[np.flatnonzero(aa)[:20]] = False           # 20 of 100 examples now broken by the attack
    run["pgd_at"] = (clean, weaker)
    result = _gate_on(paired, run, "regressed")
    assert result.exit_code == 1, result.output
    regressed = [line for line in result.output.splitlines() if "REGRESSED" in line]
    assert regressed and all("paired CI" in line for line in regressed)
    assert any("autoattack" in line for line in regressed)


def test_a_significant_drop_below_the_minimum_effect_passes(paired) -> None:
    raw = yaml.safe_load(paired["params"].read_text())
    raw["aggregate"]["gate"] = {**raw["aggregate"]["gate"], "min_effect": 25.0}
    paired["params"].write_text(yaml.safe_dump(raw))
    run = _run(0)
    clean, aa = run["pgd_at"]
    weaker = (aa & clean).copy()
    weaker[np.flatnonzero(weaker)[:20]] = False
    run["pgd_at"] = (clean, weaker)
    assert _gate_on(paired, run, "small").exit_code == 0


def test_a_record_that_disagrees_with_the_summary_is_bad_input(paired) -> None:
    summary = _write_run(paired["root"] / "bad", _run(0))
    doc = json.loads(summary.read_text())
    doc["models"]["pgd_at"]["clean"] += 3.0
    summary.write_text(json.dumps(doc))
    result = runner.invoke(app, ["gate", "--baseline", str(paired["baseline"]), "--current", str(summary),
                                 "--records", str(paired["root"] / "bad" / "records"), "--params",
                                 str(paired["params"])])
    assert result.exit_code == 2 and "another run" in result.output


def test_a_drop_within_the_baselines_seed_spread_passes_and_beyond_it_fails(paired) -> None:
    """The paired interval knows the test set only: a baseline from a replicates run adds the spread between
    trainings. The planted 20-point AutoAttack drop fails without it, passes when the seeds' std is 8 points
    (3 x 8 = 24 > 20), and fails again at std 5 (15 < 20)."""
    run = _run(0)
    clean, aa = run["pgd_at"]
    aa = aa & clean
    weaker = aa.copy()
    weaker[np.flatnonzero(aa)[:20]] = False
    run["pgd_at"] = (clean, weaker)
    doc = json.loads(paired["baseline"].read_text())
    for sd, code in ((8.0, 0), (5.0, 1)):
        doc["seed_std"] = {"pgd_at": {m: sd for m in ("autoattack", "worst_case", "robust")}}
        paired["baseline"].write_text(json.dumps(doc))
        result = _gate_on(paired, run, f"seeds{int(sd)}")
        assert result.exit_code == code, result.output
        line = next(ln for ln in result.output.splitlines() if "pgd_at" in ln and "autoattack" in ln)
        assert f"min {3 * sd:.1f}" in line


def test_a_replicates_summary_carries_the_seed_std_that_a_baseline_copies(tmp_path: Path) -> None:
    from pipeline_lib.aggregation.gate import seed_sd, write_baseline
    from pipeline_lib.aggregation.rows import Summary, summary_metrics

    def summary(**kw: Any) -> Summary:
        return Summary(rows=[], robust_metric="autoattack", reference_mode="own", reference_points=[], curve=None,
                       curve_error=None, sweeps=[], context={}, **kw)

    one = summary()
    assert "seed_std" not in summary_metrics(one)           # one seed: the file is unchanged
    three = summary(seeds=[0, 1, 2], seed_stats={"pgd_at": {"clean": (70.0, 2.5), "autoattack": (40.0, 1.25)}})
    doc = summary_metrics(three)
    assert doc["seeds"] == [0, 1, 2] and doc["seed_std"] == {"pgd_at": {"clean": 2.5, "autoattack": 1.25}}
    write_baseline(doc, tmp_path / "b.json", "ci", tmp_path / "summary.json")
    base = json.loads((tmp_path / "b.json").read_text())
    assert seed_sd(base, "pgd_at", "autoattack") == 1.25 and seed_sd(base, "standard", "clean") == 0.0


def test_the_gate_imports_no_torch(files) -> None:
    """`arpipe gate` reads JSON and YAML only: a CI job pays no torch import (seconds) for it. It runs in a
    fresh interpreter that reports the torch modules it loaded; the run must also pass (the baseline is
    compared with itself), so the check is of a real gate run, not of an early exit."""
    files["current"].write_text(json.dumps(BASELINE))
    out = arpipe_torch_probe("gate", "--baseline", str(files["baseline"]), "--current", str(files["current"]),
                             "--params", str(files["params"]))
    assert out.splitlines()[-1] == "EXIT 0 []", out[-2000:]
