"""The evaluate stage end to end on synthetic Fashion-MNIST files: outputs, metrics keys, sanity flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from datafiles import tiny_params, write_fashion_mnist
from eval_support import fit
from pipeline_lib import checkpoint
from pipeline_lib.config import Params
from pipeline_lib.data import get_spec, load_test
from pipeline_lib.evaluation.config import EvaluateConfigError, check_against
from pipeline_lib.evaluation.job import EvalOutputs
from pipeline_lib.evaluation.record import read_record_csv
from pipeline_lib.evaluation.registry import EVAL_ATTACKS, AttackEnv, AttackStep, RegisteredAttack
from pipeline_lib.models import build_model
from stages.evaluate import run
from stages.cli import app


ACC_KEYS = {"clean_acc", "fgsm_acc", "pgd_acc", "cw_acc", "autoattack_acc", "worst_case_acc"}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Params, Path]:
    """Synthetic Fashion-MNIST files, a small CNN fitted to the 32 test images it is evaluated on (so
    that there is accuracy to attack), its checkpoint, and tiny params: eps 0.05, cheap attacks,
    AutoAttack [apgd-ce, apgd-t]."""
    write_fashion_mnist(tmp_path, n_train=16, n_test=64)
    x, y = load_test("fashion_mnist", tmp_path, 32)
    torch.manual_seed(0)
    model = fit(build_model("small_cnn", get_spec("fashion_mnist")), x.float() / 255, y)
    ckpt = tmp_path / "models" / "m.pt"
    checkpoint.save_model(ckpt, model, arch="small_cnn", dataset="fashion_mnist", meta={"method": "m"})
    p = tiny_params(tmp_path, threat={"eps": 0.05},
                    evaluate={"n_eval": 32, "batch_size": 16, "eps_sweep": [0.1],
                              "pgd": {"steps": 5, "step_size": 0.0125}, "cw": {"steps": 5, "step_size": 0.0125}})
    return p, ckpt


def _outputs(root: Path) -> EvalOutputs:
    d = root / "out"
    return EvalOutputs(d / "m.json", d / "m_record.csv", d / "m.log", d / "m.png", root / "state" / "m")


def test_the_stage_writes_metrics_record_log_and_plot(setup: tuple[Params, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    p, ckpt = setup
    raw = p.model_dump(mode="json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)          # the stage keeps its resume state under ./cache/eval_state
    out = _outputs(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "m", "--model", str(ckpt), "--metrics", str(out.metrics),
                                      "--record", str(out.record), "--log", str(out.log), "--plot", str(out.plot)])
    assert result.exit_code == 0, result.output

    metrics: dict[str, Any] = json.loads(out.metrics.read_text())
    assert set(metrics) == ACC_KEYS | {"pgd_acc_eps_0.1", "pgd_steps", "n_eval", "eps", "cascade", "eval_time_s",
                                       "time_s", "flags", "warnings", "autoattack_after", "ci95"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ACC_KEYS)
    # every accuracy's Wilson 95 % bounds bracket it (k of 32 examples)
    assert set(metrics["ci95"]) == {k for k in metrics if k.endswith("_acc") or "_acc_" in k}
    assert all(b["lo"] <= metrics[k] <= b["hi"] and b["hi"] - b["lo"] > 0.1 for k, b in metrics["ci95"].items())
    assert metrics["clean_acc"] > 0.25, "the fitted model is worth attacking (chance is 0.1)"
    assert metrics["worst_case_acc"] <= min(metrics[k] for k in ACC_KEYS - {"worst_case_acc"})
    assert (metrics["n_eval"], metrics["eps"], metrics["pgd_steps"]) == (32, 0.05, 5)
    assert set(metrics["time_s"]) == {"clean", "fgsm", "pgd", "cw", "autoattack", "pgd_eps_0.1"}
    assert set(metrics["flags"]) == {"multistep_weaker_than_fgsm", "autoattack_weaker_than_pgd", "eps_not_monotone"}
    assert list(metrics["autoattack_after"]) == ["apgd-ce", "apgd-t"]

    cols = read_record_csv(out.record)
    assert len(cols["index"]) == 32 and "autoattack/apgd-t" in cols
    assert sum(map(int, cols["robust"])) == round(metrics["worst_case_acc"] * 32)
    log = out.log.read_text()
    assert "running apgd-ce" in log and "flags raised" in log
    assert out.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "cache" / "eval_state" / "m").exists(), "finished: the resume state is removed"


def test_a_planted_masked_pgd_raises_the_sanity_flags(setup: tuple[Params, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """PGD that never moves (what a zero/obfuscated gradient does to it) is weaker than FGSM and gives
    the same accuracy at every eps: both flags go up, in the metrics and in the log."""
    def masked_pgd(e: Any, env: AttackEnv) -> list[AttackStep]:
        return [AttackStep("pgd", "pgd_acc", env.eps, lambda x, y, gen: x.clone())]

    monkeypatch.setitem(EVAL_ATTACKS._entries, "pgd", RegisteredAttack(masked_pgd, EVAL_ATTACKS.get("pgd").metric))
    p, ckpt = setup
    p = p.model_copy(update={"evaluate": p.evaluate.model_copy(update={"attacks": ["fgsm", "pgd"],
                                                                       "eps_sweep": []})})
    metrics = run(p, "m", ckpt, _outputs(tmp_path))
    assert metrics["pgd_acc"] == metrics["clean_acc"] > metrics["fgsm_acc"]
    assert metrics["flags"] == {"multistep_weaker_than_fgsm": True, "eps_not_monotone": True}
    assert any("PGD accuracy" in m and "FGSM" in m for m in metrics["warnings"])
    assert "SANITY FLAG" in _outputs(tmp_path).log.read_text()


def test_missing_checkpoint_and_bad_settings_stop_the_stage_with_the_bad_value(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion_mnist(tmp_path, n_train=16, n_test=16)
    p = tiny_params(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p.model_dump(mode="json")))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "m", "--model", "nope.pt", "--metrics", "m.json",
                                      "--record", "r.csv", "--log", "m.log", "--plot", "m.png"])
    assert result.exit_code == 2 and "nope.pt does not exist" in result.output

    e, spec = p.evaluate, get_spec("fashion_mnist")
    kw = {"dataset": "fashion_mnist", "num_classes": spec.num_classes, "eps": 0.1}
    with pytest.raises(EvaluateConfigError, match="eps_sweep contains threat.eps=0.1"):
        check_against(e.model_copy(update={"eps_sweep": [0.05, 0.1]}), **kw)
    many_targets = e.autoattack.model_copy(update={"custom": e.autoattack.custom.model_copy(
        update={"target_classes": 12})})
    with pytest.raises(EvaluateConfigError, match="12 target classes"):
        check_against(e.model_copy(update={"autoattack": many_targets}), **kw)
    check_against(e, **kw)
