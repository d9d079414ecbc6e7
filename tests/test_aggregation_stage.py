"""`arpipe aggregate` on a tmp dir of synthetic metrics: outputs, one row per model, blanks for
attacks / corruption metrics that do not exist, hand-checked NRR / ARDist / mean gap, MLflow runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from scipy.stats import binomtest
from typer.testing import CliRunner

from datafiles import arpipe_torch_probe
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Fractions, as the evaluate stage writes them. Only pgd_at_b has AutoAttack and only pgd_at has CW,
# so the shared robust metric is PGD. Reference line (own: standard, pgd_at): robust = -4 clean + 360.
EVAL = {
    "standard": {"clean_acc": 0.90, "pgd_acc": 0.0},
    "pgd_at": {"clean_acc": 0.80, "pgd_acc": 0.40, "cw_acc": 0.38},
    "pgd_at_b": {"clean_acc": 0.85, "pgd_acc": 0.25, "autoattack_acc": 0.20},
}


def write_params(tmp_path: Path, **aggregate: Any) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["finetune"]["methods"] = ["pgd_at", "pgd_at_b"]
    raw["method"]["pgd_at_b"] = {"objective": "pgd_at"}        # a second pgd_at instance: a sweep of 2
    raw["evaluate"]["models"] = ["standard", "pgd_at", "pgd_at_b"]
    raw["aggregate"] = {**raw.get("aggregate", {}), **aggregate}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for sub in ("eval", "train", "corruption"):
        (tmp_path / sub).mkdir()
    for name, metrics in EVAL.items():
        (tmp_path / "eval" / f"{name}.json").write_text(
            json.dumps({**metrics, "pgd_steps": 20, "n_eval": 500, "eps": 0.1}))
    (tmp_path / "train" / "pgd_at.json").write_text(json.dumps({"train_time_s": 12.5, "val_clean_acc": 0.8}))
    (tmp_path / "corruption" / "standard.json").write_text(json.dumps({"mean_corruption_acc": 0.7}))
    return tmp_path


def aggregate_args(d: Path, params: Path, corruption: str = "corruption") -> list[str]:
    """`arpipe aggregate` over the metrics folders of `d`, writing to d/out."""
    out = d / "out"
    return ["aggregate", "--eval-dir", str(d / "eval"), "--train-dir", str(d / "train"),
            "--corruption-dir", str(d / corruption), "--table", str(out / "summary.csv"),
            "--markdown", str(out / "summary.md"), "--summary", str(out / "summary.json"),
            "--plot", str(out / "tradeoff.png"), "--params", str(params)]


def run_aggregate(d: Path, params: Path, corruption: str = "corruption"):
    return runner.invoke(app, aggregate_args(d, params, corruption)), d / "out"


def test_writes_table_markdown_summary_and_plot(workdir: Path) -> None:
    result, out = run_aggregate(workdir, write_params(workdir))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "summary.csv").set_index("model")
    assert list(table.index) == ["standard", "pgd_at", "pgd_at_b"]             # a row per model, in order
    assert (table["robust_metric"] == "pgd").all()
    assert table.loc["pgd_at_b", "clean"] == pytest.approx(85.0)
    # NRR only where the attack exists; the rest are blanks, not zeros.
    assert table.loc["pgd_at_b", "nrr_aa"] == pytest.approx(2 * 85 * 20 / 105, abs=1e-3)
    assert table.loc["pgd_at", "nrr_cw"] == pytest.approx(2 * 80 * 38 / 118, abs=1e-3)
    assert math.isnan(table.loc["standard", "nrr_aa"]) and math.isnan(table.loc["pgd_at", "autoattack"])
    assert table["fgsm"].isna().all()
    # References lie on their own line; pgd_at_b is 5 points above it -> 5 / sqrt(17).
    assert table.loc["standard", "ardist"] == pytest.approx(0.0, abs=1e-6)
    assert table.loc["pgd_at_b", "ardist"] == pytest.approx(5 / math.sqrt(17), abs=1e-3)
    assert table.loc["standard", "corruption"] == pytest.approx(70.0)
    assert math.isnan(table.loc["pgd_at", "corruption"])
    assert table.loc["pgd_at", "train_time_s"] == pytest.approx(12.5)

    md = (out / "summary.md").read_text()
    assert all(f"| {m}" in md for m in EVAL) and "PGD-20" in md and "–" in md
    summary = json.loads((out / "summary.json").read_text())
    assert "autoattack" not in summary["models"]["standard"]              # blank = absent
    # Sweep pgd_at = {pgd_at (80, 40), pgd_at_b (85, 25)}: robust = -3 x + 280, gap x - 80 on [80, 85] -> 2.5.
    assert summary["sweeps"]["pgd_at"]["mean_gap"] == pytest.approx(2.5, abs=1e-6)
    assert summary["context"]["robust_metric"] == "pgd" and summary["context"]["n_eval"] == 500
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_corruption_folder_gives_blanks(workdir: Path) -> None:
    result, out = run_aggregate(workdir, write_params(workdir), corruption="not_there")
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out / "summary.csv")["corruption"].isna().all()


def test_autoattack_is_used_when_every_model_has_it(workdir: Path) -> None:
    for name in EVAL:
        path = workdir / "eval" / f"{name}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "autoattack_acc": 0.1}))
    result, out = run_aggregate(workdir, write_params(workdir))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "summary.csv")
    assert (table["robust_metric"] == "autoattack").all() and list(table["robust"]) == pytest.approx([10.0] * 3)


def test_no_reference_point_leaves_ardist_blank_and_says_why(workdir: Path) -> None:
    # mart is not among the evaluated models: the frontier has no point (one point would be enough).
    result, out = run_aggregate(workdir, write_params(workdir, reference_models=["mart"]))
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out / "summary.csv")["ardist"].isna().all()
    assert "ARDist not computed" in (out / "summary.md").read_text()


def test_published_reference_uses_the_shipped_table(workdir: Path) -> None:
    result, out = run_aggregate(workdir, write_params(workdir, reference="published",
                                                      reference_models=["standard", "pgd_at", "trades"],
                                                      published_sources=["ar_at_t3", "arrest"]))
    assert result.exit_code == 0, result.output
    md = (out / "summary.md").read_text()
    assert "AR-AT" in md and "86.06" in md                 # the cited rows are listed with their source
    assert "compares across setups" in md                  # fashion_mnist vs the CIFAR-10 table
    assert not pd.read_csv(out / "summary.csv")["ardist"].isna().any()


@pytest.mark.parametrize("problem, match", [
    ("no_eval", "pgd_at_b"), ("fraction", "not an accuracy fraction"), ("no_clean", "no clean_acc")])
def test_bad_metrics_exit_2_naming_the_problem(workdir: Path, problem: str, match: str) -> None:
    path = workdir / "eval" / "pgd_at_b.json"
    if problem == "no_eval":
        path.unlink()
    elif problem == "fraction":
        path.write_text(json.dumps({"clean_acc": 85.0, "pgd_acc": 0.25}))   # percent where a fraction belongs
    else:
        path.write_text(json.dumps({"pgd_acc": 0.25}))
    result, _ = run_aggregate(workdir, write_params(workdir))
    assert result.exit_code == 2
    assert match in result.output.replace("\n", " ")


def test_unknown_params_are_rejected(tmp_path: Path) -> None:
    from pipeline_lib.config import ParamsError, load_params

    with pytest.raises(ParamsError, match="published_table"):
        load_params(write_params(tmp_path, published_table="imagenet_vit"))
    with pytest.raises(ParamsError, match="unknown metric"):
        load_params(write_params(tmp_path, gate={"metrics": {"clean_acc": {"abs_tol": 1.0}}}))


def use_mlflow(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLflow on, its store in `workdir`; the tracking URI."""
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("ARPIPE_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return uri


def test_mlflow_execution_run_with_a_run_per_model_updated_in_place(workdir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """tracking_layout.py: a parent per execution, a child per model with its hyperparameters, numbers,
    curves and artifacts under the same names; aggregating again updates those runs, adds none."""
    import mlflow

    uri = use_mlflow(workdir, monkeypatch)
    monkeypatch.chdir(workdir)   # artifacts land under ./mlartifacts of the tmp dir
    (workdir / "train" / "pgd_at_history.csv").write_text("epoch,val_clean_acc,train_loss\n1,0.7,2.0\n2,0.8,1.5\n")
    params = write_params(workdir)
    for _ in range(2):
        result, _ = run_aggregate(workdir, params)
        assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("arpipe").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("arpipe.role") == "execution"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(EVAL)
    assert [r.info.run_name for r in runs if r.data.tags.get("arpipe.role") == "model"].count("pgd_at") == 1
    assert parent.data.tags["dataset"] == "fashion_mnist" and parent.data.tags["profile"] == "default"
    assert parent.data.metrics["mean_gap/pgd_at"] == pytest.approx(2.5, abs=1e-6)
    b = children["pgd_at_b"].data
    assert b.metrics["ardist"] == pytest.approx(5 / math.sqrt(17), abs=1e-3)
    assert b.metrics["eval/autoattack_acc"] == pytest.approx(0.20)
    assert b.params["objective"] == "pgd_at" and b.params["optim.lr"] == "0.02"   # resolved hyperparameters
    curve = client.get_metric_history(children["pgd_at"].info.run_id, "train/val_clean_acc")
    assert sorted((m.step, m.value) for m in curve) == [(1, 0.7), (2, 0.8)]   # logged once, not once per run
    names = {m: {a.path for top in client.list_artifacts(r.info.run_id)
                 for a in client.list_artifacts(r.info.run_id, top.path)} for m, r in children.items()}
    assert names["pgd_at"] >= {"eval/metrics.json", "train/metrics.json", "train/history.csv"}
    assert names["standard"] >= {"eval/metrics.json", "corruption/metrics.json"}


def test_the_aggregate_imports_no_torch(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The aggregate reads metrics files, checks the architecture and every method's params against the
    registries and logs each model's resolved settings to MLflow: none of it needs torch (seconds per run).
    A fresh interpreter runs it, MLflow on, and reports the torch modules it loaded; the run must pass and
    the finetune instance's run carry its resolved settings, so the check is of the whole stage."""
    import mlflow

    uri = use_mlflow(workdir, monkeypatch)
    out = arpipe_torch_probe(*aggregate_args(workdir, write_params(workdir)), cwd=workdir)
    assert out.splitlines()[-1] == "EXIT 0 []", out[-2000:]
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("arpipe").experiment_id],
                               "tags.`arpipe.model` = 'pgd_at_b'")
    assert run.data.params["objective"] == "pgd_at" and "attack.steps" in run.data.params


def test_a_bad_method_param_stops_the_aggregate_before_any_work(workdir: Path) -> None:
    params = write_params(workdir)
    raw = yaml.safe_load(params.read_text())
    raw["method"]["arrest"]["params"]["phi_deg"] = 500
    params.write_text(yaml.safe_dump(raw))
    result, out = run_aggregate(workdir, params)
    assert result.exit_code == 2, result.output
    assert "invalid params" in result.output and "phi_deg" in result.output and "(got 500)" in result.output
    assert not out.exists()


def _corruption(table: dict[str, list[float]]) -> dict[str, Any]:
    """A corruption@<model> metrics dict: per-corruption accuracies by severity."""
    accs = [a for row in table.values() for a in row]
    mean = sum(accs) / len(accs)
    return {"mean_corruption_acc": mean, "mean_corruption_error": 1 - mean,
            "table": {c: {str(s + 1): a for s, a in enumerate(row)} for c, row in table.items()}}


def test_mce_relative_to_the_standard_model(workdir: Path) -> None:
    # standard errs 1.0 (fog) and 0.6 (snow) summed over severities; pgd_at 0.5 and 0.4:
    # CE = 0.5 and 2/3, mCE = 7/12 -> 58.33 %; the standard model is 100 by definition.
    (workdir / "corruption" / "standard.json").write_text(json.dumps(
        _corruption({"fog": [0.5, 0.5], "snow": [0.8, 0.6]})))
    (workdir / "corruption" / "pgd_at.json").write_text(json.dumps(
        _corruption({"fog": [0.75, 0.75], "snow": [0.8, 0.8]})))
    result, out = run_aggregate(workdir, write_params(workdir))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "summary.csv").set_index("model")
    assert table.loc["standard", "mce_std"] == pytest.approx(100.0)
    assert table.loc["pgd_at", "mce_std"] == pytest.approx(700 / 12, abs=1e-3)
    assert math.isnan(table.loc["pgd_at_b", "mce_std"])                 # no corruption metrics: blank
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["pgd_at"]["mce_std"] == pytest.approx(58.3333, abs=1e-4)
    assert re.search(r"\|\s+58\.3 \|", (out / "summary.md").read_text())


def test_no_mce_without_the_standard_models_table(workdir: Path) -> None:
    (workdir / "corruption" / "pgd_at.json").write_text(json.dumps(_corruption({"fog": [0.75, 0.75]})))
    result, out = run_aggregate(workdir, write_params(workdir))   # standard.json has no per-corruption table
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out / "summary.csv")["mce_std"].isna().all()
    assert "no mCE vs standard" in (out / "summary.md").read_text()


def _write_records(d: Path, evals: dict[str, dict[str, float]] = EVAL) -> None:
    """Per-example records in d agreeing with `evals` on 500 examples: the first k_clean right on clean images,
    of those the first k_attack survive each attack (pgd_at_b's examples shifted so pairs disagree)."""
    d.mkdir(parents=True)
    for name, metrics in evals.items():
        attacks = [k.removesuffix("_acc") for k in metrics if k != "clean_acc"]
        shift = 37 if name == "pgd_at_b" else 0
        lines = ["index,label,clean_pred,clean_correct," + ",".join(attacks) + ",robust"]
        for i in range(500):
            j = (i + shift) % 500
            clean = j < round(500 * metrics["clean_acc"])
            cells = ["0" if j < round(500 * metrics[f"{a}_acc"]) else "1" if clean else "" for a in attacks]
            lines.append(f"{i},0,{0 if clean else 1},{int(clean)}," + ",".join(cells) + f",{int('1' not in cells and clean)}")
        (d / f"{name}_record.csv").write_text("\n".join(lines) + "\n")


def _aggregate_with_records(workdir: Path, params: Path):
    out = workdir / "out"
    result = runner.invoke(app, [
        "aggregate", "--eval-dir", str(workdir / "eval"), "--record-dir", str(workdir / "records"),
        "--table", str(out / "summary.csv"), "--markdown", str(out / "summary.md"),
        "--summary", str(out / "summary.json"), "--plot", str(out / "tradeoff.png"),
        "--comparisons-csv", str(out / "comparisons.csv"), "--comparisons-md", str(out / "comparisons.md"),
        "--params", str(params)])
    return result, out


def test_records_give_intervals_and_paired_comparisons(workdir: Path) -> None:
    _write_records(workdir / "records")
    result, out = _aggregate_with_records(workdir, write_params(workdir))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "summary.csv").set_index("model")
    wilson = binomtest(400, 500).proportion_ci(method="wilson")                # pgd_at: 400 of 500 clean
    bounds = (100 * wilson.low, 100 * wilson.high)
    assert (table.loc["pgd_at", "clean_lo"], table.loc["pgd_at", "clean_hi"]) == pytest.approx(bounds, abs=1e-4)
    assert table.loc["pgd_at_b", "ardist_lo"] < table.loc["pgd_at_b", "ardist"] < table.loc["pgd_at_b", "ardist_hi"]
    assert table.loc["standard", "ardist_hi"] <= 1e-9                        # a reference never beyond its frontier
    comp = pd.read_csv(out / "comparisons.csv")
    assert set(zip(comp["model"], comp["metric"])) == {("standard", "clean"), ("standard", "pgd"),
                                                      ("pgd_at_b", "clean"), ("pgd_at_b", "pgd")}
    row = comp.set_index(["model", "metric"]).loc[("standard", "pgd")]
    # pgd_at survives PGD on examples 0..199, standard on none: 200 discordant pairs, all for pgd_at
    assert (row["model_only"], row["baseline_only"], row["diff"]) == (0, 200, pytest.approx(-40.0))
    assert row["p_holm"] < 1e-10 and bool(row["significant"])
    md = (out / "summary.md").read_text()
    assert "80.0 ±3.5" in md and "Paired comparisons" in md and "▼" in md
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ci95"]["pgd_at"]["clean"] == {"lo": pytest.approx(bounds[0], abs=1e-4),
                                                  "hi": pytest.approx(bounds[1], abs=1e-4)}
    assert "clean_lo" not in summary["models"]["pgd_at"]                     # bounds stay out of the gated metrics


def test_replicate_seeds_give_mean_std_and_stratified_comparisons(workdir: Path) -> None:
    _write_records(workdir / "records")
    seed1 = {**EVAL, "pgd_at": {**EVAL["pgd_at"], "clean_acc": 0.84}}     # pgd_at's clean 80 / 84 over seeds
    (workdir / "eval" / "seed1").mkdir()
    for name, metrics in seed1.items():
        (workdir / "eval" / "seed1" / f"{name}.json").write_text(
            json.dumps({**metrics, "pgd_steps": 20, "n_eval": 500, "eps": 0.1}))
    _write_records(workdir / "records" / "seed1", seed1)
    params = write_params(workdir)
    raw = yaml.safe_load(params.read_text())
    raw["replicates"] = [1]
    params.write_text(yaml.safe_dump(raw))
    result, out = _aggregate_with_records(workdir, params)
    assert result.exit_code == 0, result.output
    md = (out / "summary.md").read_text()
    assert "mean ± std over 2 seeds (0, 1)" in md
    assert f"82.0 ± {math.sqrt(8):.1f}" in md                              # mean and sample std of 80, 84
    comp = pd.read_csv(out / "comparisons.csv").set_index(["model", "metric"])
    # stratified: 500 examples x 2 seeds; standard's clean 90 vs pgd_at's 80 and 84 -> +8 points on average
    assert comp.loc[("standard", "clean"), "n"] == 1000
    assert comp.loc[("standard", "clean"), "diff"] == pytest.approx(8.0)
