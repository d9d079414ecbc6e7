"""Every paper profile end to end at tiny size, through the stage commands (in-process).

For each of cifar10_resnet18, cifar10_wrn34_10, cifar100_resnet18 and cifar100_wrn34_10 the
composed profile runs pretrain, finetune@<every method>, evaluate@<every model> (AutoAttack
`standard`), corrupt, corruption@<every model> and aggregate on CIFAR-format files the test writes.
Only sizes are overridden: images (32 train, 8 validation), one epoch, 2 attack steps, 2 evaluated
images, 3 of the corruptions on 2 images, and the width (ResNet-18 with 8 base channels, WRN-34-1): depth and module names stay,
so AR-AT's layer names and CURE's RGP layers of the profile resolve as at full size. The
released CIFAR-C archive has its own test (test_corruption_cifar_c.py); here the corruptions
are generated, through the same two stages. The stages run through typer's CliRunner on
`stages.cli.app` (the code `dvc repro` runs, without ~10 s of process start-up per stage).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from datafiles import CIFAR, base_params_dict, write_cifar
from typer.testing import CliRunner

from pipeline_lib.config import parse_params
from pipeline_lib.models import MODELS
from pipeline_lib.models.resnet import ResNet
from pipeline_lib.models.wide_resnet import WideResNet
from pipeline_lib.profiles import deep_merge
from stages.cli import app

PAPER = ["cifar10_resnet18", "cifar10_wrn34_10", "cifar100_resnet18", "cifar100_wrn34_10"]
TINY_OPTIM = {"epochs": 1, "batch_size": 16, "milestones": []}
runner = CliRunner()


def tiny_overlay(root: Path, methods: list[str]) -> dict[str, Any]:
    """Sizes only: every other setting is the profile's."""
    return {
        "data": {"root": str(root), "download": False, "n_train": 32, "n_val": 8},
        "runtime": {"progress": False, "device": "cpu", "num_threads": 1},
        "threat": {"train_steps": 2},
        "pretrain": {"optim": TINY_OPTIM},
        "finetune": {"optim": TINY_OPTIM},
        "method": {m: {"optim": TINY_OPTIM, **({"params": {"balance_images": 16}} if m == "arat" else {})}
                   for m in methods},
        "evaluate": {"n_eval": 2, "batch_size": 2, "pgd": {"steps": 2}, "cw": {"steps": 2}},
        "corruption": {"source": "generated", "download": False, "n_images": 2, "batch_size": 10,
                       "corruptions": ["gaussian_noise", "defocus_blur", "jpeg_compression"], "extra": []},
    }


def invoke(*args: str) -> None:
    t0 = time.perf_counter()
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"arpipe {' '.join(args)} failed:\n{result.output}\n{result.exception!r}"
    stage = args[0] if args[1].startswith("--") else f"{args[0]}@{args[1]}"
    print(f"  {stage}: {time.perf_counter() - t0:.1f} s")   # shown with -s: where the test's time goes


@pytest.fixture
def thin_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """ResNet-18 at 8 base channels, WRN-34-1: the registry builds these under the profiles' names."""
    monkeypatch.setitem(MODELS._entries, "resnet18",
                        lambda s: ResNet((2, 2, 2, 2), s.num_classes, s.channels, s.mean, s.std, width=8))
    monkeypatch.setitem(MODELS._entries, "wrn34_10",
                        lambda s: WideResNet(34, 1, s.num_classes, s.channels, s.mean, s.std))


@pytest.mark.slow
@pytest.mark.paper_e2e
@pytest.mark.parametrize("profile", PAPER)
def test_paper_profile_runs_end_to_end(profile: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       thin_models: None) -> None:
    t0 = time.perf_counter()
    monkeypatch.chdir(tmp_path)          # the stages' resumable state lives under ./cache
    raw = base_params_dict(profile)
    train_files = CIFAR[raw["data"]["dataset"]][4]   # CIFAR-10: 5 training batches, CIFAR-100: one file
    write_cifar(tmp_path / "data", raw["data"]["dataset"], n_per_file=40 // len(train_files))
    raw = deep_merge(raw, tiny_overlay(tmp_path / "data", raw["finetune"]["methods"]))
    p = parse_params(raw, profile)        # the composed profile validates as it is
    assert p.evaluate.autoattack.version == "standard"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    P = ("--params", str(params))

    invoke("pretrain", "--out", "models/standard.pt", "--metrics", "metrics/train/standard.json",
           "--history", "metrics/train/standard.csv", *P)
    for m in p.finetune.methods:
        invoke("finetune", m, "--pretrained", "models/standard.pt", "--out", f"models/{m}.pt",
               "--metrics", f"metrics/train/{m}.json", "--history", f"metrics/train/{m}.csv", *P)
    data = f"data/corrupted/{p.data.dataset}"
    invoke("corrupt", "--out", data, "--samples", "metrics/corruption/samples.png", *P)
    for m in p.evaluate.models:
        invoke("evaluate", m, "--model", f"models/{m}.pt", "--metrics", f"metrics/eval/{m}.json",
               "--record", f"metrics/eval/{m}.csv", "--log", f"metrics/eval/{m}.log",
               "--plot", f"metrics/eval/{m}.png", *P)
        invoke("corruption", m, "--model", f"models/{m}.pt", "--data", data,
               "--metrics", f"metrics/corruption/{m}.json", "--heatmap", f"metrics/corruption/{m}.png", *P)
    invoke("aggregate", "--eval-dir", "metrics/eval", "--train-dir", "metrics/train",
           "--corruption-dir", "metrics/corruption", "--table", "agg/summary.csv", "--markdown", "agg/summary.md",
           "--summary", "agg/summary.json", "--plot", "agg/tradeoff.png", *P)

    for m in p.evaluate.models:
        ev = json.loads(Path(f"metrics/eval/{m}.json").read_text())
        assert 0.0 <= ev["autoattack_acc"] <= ev["clean_acc"] <= 1.0, m
        assert "mean_corruption_acc" in json.loads(Path(f"metrics/corruption/{m}.json").read_text())
    summary = Path("agg/summary.md").read_text()
    assert all(m in summary for m in p.evaluate.models)
    print(f"{profile}: end to end in {time.perf_counter() - t0:.1f} s")
