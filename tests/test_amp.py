"""GPU fast paths, checked on CPU: bf16 autocast, channels_last and the pinned-memory loader.

Each path must run (and fall back) cleanly on a CPU-only machine: bf16 autocast runs on
torch's CPU autocast, channels_last is a memory layout, the pinned loader gathers batches in
worker processes and only pins when a GPU is present.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from datafiles import banded_images, tiny_params, write_fashion_mnist
from pipeline_lib.config import OptimParams, ParamsError
from pipeline_lib.data import BatchLoader, get_spec
from pipeline_lib.io import read_json
from pipeline_lib.methods import build_objective
from pipeline_lib.models import build_model
from pipeline_lib.runtime import autocast, check_amp
from pipeline_lib.training import TrainOutputs, fit, pretrain_job
from stages.train import train

OPTIM = OptimParams(epochs=1, batch_size=16, lr=0.05)


def _loaders(**kw: Any) -> tuple[BatchLoader, BatchLoader]:
    images, labels = (torch.from_numpy(a) for a in banded_images(32, 1, 28, 10, seed=2))
    return (BatchLoader(images, labels, 16, shuffle=True, augment="flip", drop_last=True, seed=0, **kw),
            BatchLoader(images[:16], labels[:16], 16, **kw))


def _conv_output_dtypes(model: nn.Module) -> tuple[list[torch.dtype], list[Any]]:
    """Record the dtype of every conv output (attack forwards included) via forward hooks."""
    seen: list[torch.dtype] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
               for m in model.modules() if isinstance(m, nn.Conv2d)]
    return seen, handles


@pytest.mark.parametrize("objective", ["pgd_at", "cure"])
def test_bf16_autocast_step_runs_on_cpu(objective: str, make_ctx: Any) -> None:
    """One epoch (2 steps) under bf16 autocast: every forward, the PGD / TRADES attack's included,
    runs in bf16; the loss is finite; parameters and gradients stay fp32 and the weights move."""
    torch.manual_seed(0)
    obj = build_objective(objective, None, make_ctx(steps=2))
    model = obj.prepare_model(build_model("small_cnn", get_spec("fashion_mnist")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen, handles = _conv_output_dtypes(model)
    loader, val = _loaders()
    result = fit(model, obj, loader, val, OPTIM, seed=0, progress=False, amp="bf16")
    for h in handles:
        h.remove()
    record = result.history[-1]
    assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0
    # per step: attack forwards (2 steps) + loss forwards, each through all 4 convs; val runs outside autocast
    n_val_convs = 4 * len(val)
    train_dtypes = seen[:-n_val_convs]
    assert len(train_dtypes) >= 4 * 2 * (2 + 1) and set(train_dtypes) == {torch.bfloat16}
    assert set(seen[-n_val_convs:]) == {torch.float32}          # evaluation stays fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if v.is_floating_point())


def test_amp_none_is_plain_fp32(make_ctx: Any) -> None:
    torch.manual_seed(0)
    obj = build_objective("pgd_at", None, make_ctx(steps=1))
    model = obj.prepare_model(build_model("small_cnn", get_spec("fashion_mnist")))
    seen, handles = _conv_output_dtypes(model)
    fit(model, obj, *_loaders(), OPTIM, seed=0, progress=False, amp="none")
    for h in handles:
        h.remove()
    assert seen and set(seen) == {torch.float32}


def test_amp_settings_fail_before_any_work() -> None:
    with pytest.raises(ValueError, match="'fp16'"):
        check_amp("fp16", torch.device("cpu"))
    with autocast("none", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ParamsError, match="runtime.amp"):
        tiny_params(Path("."), runtime={"amp": "fp16"})


def test_channels_last_trains_the_same_model(make_ctx: Any) -> None:
    """NHWC weights and batches: the same computation in another memory layout (kernels sum in
    another order, so equal to float tolerance, not bit for bit). Clean training: PGD's sign()
    would turn those rounding differences into whole steps and compare chaos, not layouts."""
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        obj = build_objective("standard", None, make_ctx(steps=2))
        model = obj.prepare_model(build_model("small_cnn", get_spec("fashion_mnist"))).to(memory_format=fmt)
        loader, val = _loaders(memory_format=fmt)
        x, _ = next(iter(loader))
        assert x.is_contiguous(memory_format=fmt)
        results.append(fit(model, obj, loader, val, OPTIM, seed=0, progress=False))
    assert results[1].model.block1[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    a, b = (r.model.state_dict() for r in results)
    assert max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point()) < 1e-4


@pytest.mark.parametrize("workers", [0, 2])
def test_pinned_loader_yields_the_device_loaders_batches(workers: int) -> None:
    images, labels = (torch.from_numpy(a) for a in banded_images(50, 3, 8, 10, seed=1))
    kw: dict[str, Any] = {"shuffle": True, "augment": "crop_flip", "drop_last": False, "seed": 7}
    resident = BatchLoader(images, labels, 16, **kw)
    pinned = BatchLoader(images, labels, 16, storage="pinned", num_workers=workers, **kw)
    for epoch in (0, 3):
        resident.set_epoch(epoch)
        pinned.set_epoch(epoch)
        a, b = list(resident), list(pinned)
        assert [len(y) for _, y in b] == [16, 16, 16, 2]
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="storage 'disk'"):
        BatchLoader(images, labels, 16, storage="disk")  # type: ignore[arg-type]


def test_training_stage_with_every_fast_path_on_cpu(tmp_path: Path) -> None:
    """run_training with bf16, channels_last and the pinned loader (2 workers): outputs as usual."""
    write_fashion_mnist(tmp_path / "data", n_train=128, n_test=64)
    p = tiny_params(tmp_path / "data", runtime={"amp": "bf16", "channels_last": True, "loader": "pinned",
                                                "num_workers": 2, "device": "cpu", "progress": False},
                    pretrain={"optim": {"epochs": 1, "batch_size": 32, "milestones": []}})
    out = TrainOutputs(tmp_path / "m.pt", tmp_path / "m.json", tmp_path / "h.csv", tmp_path / "state.pt")
    metrics = train(p, pretrain_job(p.pretrain.optim, p.threat), out)
    assert read_json(out.metrics) == metrics and metrics["world_size"] == 1
    assert math.isfinite(metrics["train_loss"]) and 0 <= metrics["val_clean_acc"] <= 1
    assert out.checkpoint.exists() and not out.state.exists()
