"""Errors the user can fix: `arpipe` prints one line and exits 2 (the traceback only with --debug
or ARPIPE_DEBUG=1), fails before any work on unwritable outputs, and refuses to file one method's
checkpoint under another method's name. Each case plants the real failure and runs the real command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from datafiles import REPO, tiny_params, write_fashion_mnist
from pipeline_lib import checkpoint
from pipeline_lib.corruption.store import write_manifest, write_set
from pipeline_lib.data import get_spec, load_test
from pipeline_lib.data.sources import FASHION_FILES
from pipeline_lib.io import read_json
from pipeline_lib.models import build_model
from stages.cli import app


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder: synthetic Fashion-MNIST, tiny params.yaml (cheap evaluation), a small_cnn
    checkpoint trained as 'pgd_at' at models/pgd_at.pt; the working directory for the command."""
    write_fashion_mnist(tmp_path, n_train=128, n_test=64)
    _write_params(tmp_path / "params.yaml", tmp_path)
    torch.manual_seed(0)
    model = build_model("small_cnn", get_spec("fashion_mnist"))
    checkpoint.save_model(tmp_path / "models" / "pgd_at.pt", model, arch="small_cnn", dataset="fashion_mnist",
                          meta={"method": "pgd_at"})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write_params(path: Path, root: Path, **sections: Any) -> Path:
    cheap = {"n_eval": 16, "batch_size": 16, "attacks": ["fgsm"], "eps_sweep": []}
    p = tiny_params(root, **{"evaluate": cheap, **sections})
    path.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    return path


def _evaluate_args(name: str, model: str, out: str = "metrics/eval") -> list[str]:
    return ["evaluate", name, "--model", model, "--metrics", f"{out}/{name}.json", "--record",
            f"{out}/{name}_record.csv", "--log", f"{out}/{name}.log", "--plot", f"{out}/{name}.png"]


PRETRAIN = ["pretrain", "--out", "models/standard.pt", "--metrics", "metrics/train/standard.json",
            "--history", "metrics/train/standard_history.csv"]


def _one_line_error(args: list[str]) -> str:
    """Run `arpipe args` in-process; it must fail with exit 2 and print exactly one line."""
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


# --------------------------------------------------------------------------- one line per case
def test_bare_state_dict(work: Path) -> None:
    torch.save(build_model("small_cnn", get_spec("fashion_mnist")).state_dict(), work / "models" / "bare.pt")
    line = _one_line_error(_evaluate_args("pgd_at", "models/bare.pt"))
    assert line.startswith("error: models/bare.pt is not an arpipe model checkpoint but a bare state_dict")


def test_truncated_and_empty_checkpoints(work: Path) -> None:
    blob = (work / "models" / "pgd_at.pt").read_bytes()
    (work / "models" / "pgd_at.pt").write_bytes(blob[:len(blob) // 2])
    assert "models/pgd_at.pt" in _one_line_error(_evaluate_args("pgd_at", "models/pgd_at.pt"))
    (work / "models" / "pgd_at.pt").write_bytes(b"")
    assert "models/pgd_at.pt is empty (0 bytes)" in _one_line_error(_evaluate_args("pgd_at", "models/pgd_at.pt"))


def test_resnet_checkpoint_as_pretrained_for_a_small_cnn_run(work: Path) -> None:
    resnet = build_model("resnet18", get_spec("fashion_mnist"))
    checkpoint.save_model(work / "models" / "standard.pt", resnet, arch="resnet18", dataset="fashion_mnist",
                          meta={"method": "standard"})
    line = _one_line_error(["finetune", "pgd_at", "--pretrained", "models/standard.pt", "--out", "models/x.pt",
                            "--metrics", "m.json", "--history", "h.csv"])
    assert "models/standard.pt holds resnet18" in line and "model.arch=small_cnn" in line


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_idx_file(work: Path, damage: str) -> None:
    path = work / "FashionMNIST" / "raw" / FASHION_FILES[True][0]
    blob = path.read_bytes()
    path.write_bytes(blob[:len(blob) // 3] if damage == "truncated" else os.urandom(len(blob)))
    assert str(path) in _one_line_error(PRETRAIN)


def test_cifar_selected_without_its_data(work: Path) -> None:
    _write_params(work / "params.yaml", work, data={"dataset": "cifar10"})
    line = _one_line_error(PRETRAIN)
    assert "cifar-10-batches-py" in line and "data.download: true" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(work: Path) -> None:
    _write_params(work / "params.yaml", work, runtime={"device": "cuda", "progress": False})
    assert "runtime.device='cuda' but torch sees no CUDA device" in _one_line_error(PRETRAIN)


def test_params_naming_a_directory_or_nothing(work: Path) -> None:
    (work / "conf_dir").mkdir()
    assert "conf_dir is a directory" in _one_line_error([*PRETRAIN, "--params", "conf_dir"])
    assert "nope.yaml does not exist" in _one_line_error([*PRETRAIN, "--params", "nope.yaml"])


def test_infinite_weight_decay_is_a_params_error(work: Path) -> None:
    _write_params(work / "params.yaml", work)
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["pretrain"]["optim"]["weight_decay"] = float("inf")
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    assert "pretrain.optim.weight_decay" in _one_line_error(PRETRAIN)


def test_diverging_training_stops_before_any_checkpoint(work: Path) -> None:
    _write_params(work / "params.yaml", work, pretrain={"optim": {"lr": 1e9, "epochs": 2, "milestones": [1]}})
    line = _one_line_error(PRETRAIN)
    assert "training loss became" in line and "epoch 1" in line and "optim.lr (now 1e+09)" in line
    assert not (work / "models" / "standard.pt").exists()
    assert not (work / "cache" / "train_state" / "pretrain.pt").exists()   # no diverged epoch was saved


# --------------------------------------------------------------------------- unwritable outputs
@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder no file can be created in: chmod for a normal user; root ignores modes, so a
    read-only tmpfs is mounted over it (skipped where neither can be arranged)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    mounted = False
    if os.access(folder, os.W_OK):   # root
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)],
                                 capture_output=True, check=False).returncode == 0
        if not mounted:
            pytest.skip("cannot make a read-only folder here (root without mount)")
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=False)
        folder.chmod(0o755)


def test_read_only_outputs_fail_before_any_work(work: Path, read_only_dir: Path) -> None:
    line = _one_line_error([*PRETRAIN[:-2], "--history", str(read_only_dir / "h.csv")])
    assert f"cannot write {read_only_dir / 'h.csv'}" in line and "not writable" in line
    assert not (work / "cache").exists(), "no epoch ran (the resume state is written after each)"

    line = _one_line_error(_evaluate_args("pgd_at", "models/pgd_at.pt", out=str(read_only_dir)))
    assert str(read_only_dir / "pgd_at.json") in line
    assert not (work / "cache").exists(), "no attack ran (the resume state is written after each batch)"


# --------------------------------------------------------------------------- silent wrong
def test_a_checkpoint_is_not_filed_under_another_methods_name(work: Path) -> None:
    line = _one_line_error(_evaluate_args("trades", "models/pgd_at.pt"))
    assert "models/pgd_at.pt holds the model trained as 'pgd_at'" in line and "evaluated as 'trades'" in line
    assert not (work / "metrics").exists()
    corruption = ["corruption", "trades", "--model", "models/pgd_at.pt", "--data", str(_corrupted_set(work)),
                  "--metrics", "c.json", "--heatmap", "c.png"]
    assert "trained as 'pgd_at'" in _one_line_error(corruption)
    assert not (work / "c.json").exists()

    for args, metrics in ((_evaluate_args("trades", "models/pgd_at.pt"), work / "metrics" / "eval" / "trades.json"),
                          (corruption, work / "c.json")):
        result = CliRunner().invoke(app, [*args, "--allow-name-mismatch"])
        assert result.exit_code == 0, result.output
        assert 0 <= read_json(metrics)["clean_acc"] <= 1


def _corrupted_set(root: Path, n: int = 16) -> Path:
    """A corrupt-stage output folder with one corruption (noisy copies of the first n test images)."""
    x, y = load_test("fashion_mnist", root, n)
    images = x.permute(0, 2, 3, 1).numpy()                                      # (n, H, W, C) uint8
    rng = np.random.default_rng(0)
    noisy = np.concatenate([np.clip(images + rng.integers(0, 40 * s, images.shape), 0, 255).astype(np.uint8)
                            for s in range(1, 6)])                              # (5 n, H, W, C): severities 1..5
    folder = root / "corrupt"
    write_set(folder, {"gaussian_noise": noisy}, y.numpy())
    write_manifest(folder, {"dataset": "fashion_mnist", "data_dir": ".", "source": "generated", "n_images": n,
                            "corruptions": ["gaussian_noise"], "extra": []})
    return folder


# --------------------------------------------------------------------------- --debug
def _arpipe(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, check=False)


def test_traceback_only_with_debug(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save({"w": torch.zeros(2)}, work / "models" / "bare.pt")
    args = _evaluate_args("pgd_at", "models/bare.pt")
    plain = _arpipe(args, work)
    assert plain.returncode == 2
    assert [line for line in plain.stderr.splitlines() if line.strip()] == [
        "error: models/bare.pt is not an arpipe model checkpoint but a bare state_dict (1 tensors, no architecture "
        "or dataset); use a checkpoint written by the pretrain/finetune stages (arpipe-model/1: format, arch, "
        "dataset, state_dict, meta)"]
    debug = _arpipe(["--debug", *args], work)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "CheckpointError" in debug.stderr

    monkeypatch.setenv("ARPIPE_DEBUG", "1")          # the variable lets the exception through as well
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, checkpoint.CheckpointError)


def test_other_exceptions_are_one_line_too(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (not a UserError) still prints one line, exit 1, pointing at --debug; a file the OS refuses
    names the file. Planted: a multi-line RuntimeError from inside the stage, a permission error."""
    import pipeline_lib.evaluation.job as job

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("first line\n" + "tensor dump\n" * 500)

    monkeypatch.setattr(job, "run_evaluation", broken)
    result = CliRunner().invoke(app, _evaluate_args("pgd_at", "models/pgd_at.pt"))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and len(lines[0]) < 500, result.output
    assert lines[0].startswith("error: unexpected RuntimeError: first line tensor dump") and "--debug" in lines[0]

    def denied(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", "metrics/eval/pgd_at.json")

    monkeypatch.setattr(job, "run_evaluation", denied)
    assert _one_line_error(_evaluate_args("pgd_at", "models/pgd_at.pt")) == \
        "error: metrics/eval/pgd_at.json: Permission denied"
