"""pyautoattack's bundled ResNet-18 checkpoint, imported and evaluated through the pipeline's stages on
CIFAR-10-format test data (the test batch alone), gives the per-example AutoAttack result of a direct
pyautoattack run on pyautoattack's own ResNet-18 module; `benchmark()` on that module gives it too."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from torch import nn
from typer.testing import CliRunner

from datafiles import banded_images, base_params_dict, cifar_batch
from pipeline_lib.benchmark import benchmark
from pipeline_lib.evaluation.record import read_record_csv
from stages.cli import app

EXAMPLES = Path(importlib.util.find_spec("pyautoattack").origin).parent / "examples"   # type: ignore[arg-type]
EPS = 0.5 / 255      # this model keeps about half of these images at this budget
N, BATCH, ITERS = 8, 4, 10   # two AutoAttack batches; 10 APGD iterations keep ResNet-18 on a CPU quick
AA = {"version": "custom", "custom": {"attacks": ["apgd-ce", "apgd-t"], "target_classes": 1,
                                      "apgd_iterations": ITERS}}


def _their_resnet18() -> nn.Module:
    """pyautoattack's examples/resnet.py ResNet18 with examples/model_test.pt loaded, as its eval.py does."""
    spec = importlib.util.spec_from_file_location("pyautoattack_example_resnet", EXAMPLES / "resnet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.ResNet18()
    model.load_state_dict(torch.load(EXAMPLES / "model_test.pt", map_location="cpu", weights_only=True))
    return model.eval()


def _direct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) robust flags of pyautoattack run directly: its custom version with APGD built at ITERS iterations."""
    aa = AutoAttack(model, attacks=["apgd-ce", "apgd-t"], version="custom", norm="Linf", eps=EPS, seed=0)
    aa.apgd = APGDAttack(model, n_restarts=1, n_iter=ITERS, eps=EPS, norm="Linf", seed=0, logger=aa.logger)
    aa.apgd_targeted = APGDAttack_targeted(model, n_restarts=1, n_iter=ITERS, n_target_classes=1, eps=EPS,
                                           norm="Linf", seed=0, logger=aa.logger)
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=BATCH)
    return y_adv == y


def _params(tmp_path: Path) -> Path:
    raw: dict[str, Any] = base_params_dict("ci")
    raw["data"].update({"dataset": "cifar10", "root": str(tmp_path / "data")})
    raw["runtime"].update({"progress": False, "device": "cpu"})
    raw["threat"]["eps"] = EPS
    raw["evaluate"].update({"models": ["aa_example"], "n_eval": N, "batch_size": BATCH, "attacks": ["autoattack"],
                            "autoattack": AA, "eps_sweep": []})
    raw["external"] = {"aa_example": {"path": str(EXAMPLES / "model_test.pt"), "format": "state_dict",
                                      "arch": "resnet18", "dataset": "cifar10", "normalization": "none",
                                      "source": "pyautoattack 0.2.0 examples/model_test.pt"}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def test_imported_pyautoattack_example_matches_direct_autoattack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _their_resnet18()
    images, _ = banded_images(N, 3, 32, 10, seed=0)
    x = torch.from_numpy(images).float() / 255
    with torch.no_grad():
        labels = reference(x).argmax(1)    # every image clean-correct: AutoAttack decides each one
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "test_batch", "wb") as fh:   # the test split only: no training batches
        pickle.dump(cifar_batch(images, labels.numpy(), "labels"), fh, protocol=2)

    direct = _direct(reference, x, labels)
    assert 0 < int(direct.sum()) < N, "the comparison needs both robust and broken examples"

    params = _params(tmp_path)
    monkeypatch.chdir(tmp_path)
    _run("import-model", "aa_example", "--out", "models/aa_example.pt", "-p", str(params))
    _run("evaluate", "aa_example", "--model", "models/aa_example.pt", "--metrics", "metrics/eval/aa_example.json",
         "--record", "rec.csv", "--log", "aa.log", "--plot", "aa.png", "-p", str(params))
    record = read_record_csv(tmp_path / "rec.csv")
    assert record["clean_correct"] == ["1"] * N
    assert [r == "1" for r in record["robust"]] == direct.tolist()
    metrics = yaml.safe_load((tmp_path / "metrics" / "eval" / "aa_example.json").read_text())
    assert metrics["autoattack_acc"] == int(direct.sum()) / N

    # the public entry point on pyautoattack's own module (no import step): the same cascade and record
    result = benchmark(reference, x, labels, dataset="cifar10", eps=EPS,
                       evaluate={"attacks": ["autoattack"], "batch_size": BATCH, "autoattack": AA})
    cols = [j for j, st in enumerate(result.steps) if st.worst_case]
    assert result.record.robust(cols).tolist() == direct.tolist()
    assert result.metrics["autoattack_acc"] == metrics["autoattack_acc"]
    assert result.metrics["flags"] == metrics["flags"]
