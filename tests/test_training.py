"""The shared training loop: determinism, bit-identical resume after a kill, LR schedules, mode hygiene."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from datafiles import banded_images, tiny_params, write_fashion_mnist
from pipeline_lib import checkpoint
from pipeline_lib.config import OptimParams
from pipeline_lib.data import BatchLoader, get_spec
from pipeline_lib.io import read_json
from pipeline_lib.methods import OBJECTIVES, Objective, ObjectiveContext, StepOutput, build_objective
from pipeline_lib.models import build_model
from pipeline_lib.training import TrainOutputs, fit, pretrain_job
from pipeline_lib.training.loop import STATE_FORMAT
from stages.train import train


class SimulatedKill(BaseException):
    """Stands for SIGKILL: raised mid-epoch, it skips every `except Exception` on the way out."""


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = banded_images(n, 1, 28, 10, seed)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _loaders(seed: int = 0) -> tuple[BatchLoader, BatchLoader]:
    x, y = _data(64, 1)
    xv, yv = _data(32, 2)
    # 4 steps per epoch; shuffled and flipped so the loader's seeded stream matters.
    return (BatchLoader(x, y, 16, shuffle=True, augment="flip", drop_last=True, seed=seed),
            BatchLoader(xv, yv, 16))


def _model(init_seed: int = 0) -> nn.Module:
    torch.manual_seed(init_seed)
    return build_model("small_cnn", get_spec("fashion_mnist"))


OPTIM = OptimParams(epochs=3, batch_size=16, lr=0.05, milestones=[2])


def _train(make_ctx: Any, objective: str = "pgd_at", seed: int = 0, init_seed: int = 0,
           state_path: Path | None = None, fingerprint: str = "fp", optim: OptimParams = OPTIM,
           objective_cls: type[Objective] | None = None, on_epoch: Any = None) -> Any:
    loader, val = _loaders(seed)
    ctx = make_ctx(seed=seed)
    obj = objective_cls(objective_cls.Params(), ctx) if objective_cls else build_objective(objective, None, ctx)
    model = obj.prepare_model(_model(init_seed))
    return fit(model, obj, loader, val, optim, seed=seed, state_path=state_path, fingerprint=fingerprint,
               progress=False, on_epoch=on_epoch)


def _timeless(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in rec.items() if k != "epoch_time_s"} for rec in history]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_same_metrics_and_weights(make_ctx: Any) -> None:
    a, b = _train(make_ctx), _train(make_ctx)
    assert _timeless(a.history) == _timeless(b.history)
    assert _same_weights(a.model, b.model)
    assert [r["epoch"] for r in a.history] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["val_clean_acc"] <= 1 for r in a.history)
    c = _train(make_ctx, seed=1)
    assert not _same_weights(a.model, c.model)


def _killed_at(call: int) -> type[Objective]:
    """PGD-AT that dies at its `call`-th training step."""
    base = OBJECTIVES.get("pgd_at")

    class Killed(base):  # type: ignore[misc, valid-type]
        calls = 0

        def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
            type(self).calls += 1
            if type(self).calls == call:
                raise SimulatedKill
            return super().loss(model, x, y)

    return Killed


def test_resume_after_a_kill_is_bit_identical(make_ctx: Any, tmp_path: Path) -> None:
    state = tmp_path / "state.pt"
    reference = _train(make_ctx)
    with pytest.raises(SimulatedKill):
        _train(make_ctx, state_path=state, objective_cls=_killed_at(4 + 3))   # 3rd step of epoch 2
    saved = checkpoint.load(state)
    assert saved["format"] == STATE_FORMAT and saved["epoch"] == 1           # the last completed epoch

    seen: list[float] = []
    counting = _killed_at(-1)
    # Another initialisation: the weights must come from the state file, not from the init.
    resumed = _train(make_ctx, init_seed=7, state_path=state, objective_cls=counting,
                     on_epoch=lambda rec: seen.append(rec["epoch"]))
    assert resumed.resumed_from_epoch == 1
    assert counting.calls == 2 * 4                                           # only epochs 2 and 3 ran
    assert seen == [1, 2, 3]                                                  # epoch 1 replayed to the logger
    assert _timeless(resumed.history) == _timeless(reference.history)
    assert _same_weights(resumed.model, reference.model)


def test_state_of_another_configuration_is_ignored(make_ctx: Any, tmp_path: Path) -> None:
    state = tmp_path / "state.pt"
    short = OptimParams(epochs=1, batch_size=16, lr=0.05)
    _train(make_ctx, "standard", state_path=state, fingerprint="config-A", optim=short)
    with pytest.warns(RuntimeWarning, match="different configuration"):
        result = _train(make_ctx, "standard", state_path=state, fingerprint="config-B", optim=short)
    assert result.resumed_from_epoch == 0
    assert checkpoint.load(state)["fingerprint"] == "config-B"


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["cut-in-half", "empty"])
def test_unreadable_state_is_moved_aside_and_training_starts_afresh(make_ctx: Any, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture,
                                                                   keep: float) -> None:
    state = tmp_path / "state.pt"
    with pytest.raises(SimulatedKill):
        _train(make_ctx, state_path=state, objective_cls=_killed_at(4 + 3))
    blob = state.read_bytes()
    state.write_bytes(blob[:int(len(blob) * keep)])          # a copy or disk that gave out mid-file

    with caplog.at_level("WARNING"):
        rerun = _train(make_ctx, state_path=state)
    assert rerun.resumed_from_epoch == 0
    assert _same_weights(rerun.model, _train(make_ctx).model)     # a fresh run, not a failure on every rerun
    aside = tmp_path / "state.pt.corrupt"
    assert aside.read_bytes() == blob[:int(len(blob) * keep)]
    assert checkpoint.load(state)["epoch"] == OPTIM.epochs        # the rerun wrote a good state again
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "\n" not in warning and str(state) in warning and str(aside) in warning


def _lr_of_epochs(make_ctx: Any, optim: OptimParams) -> list[float]:
    history = _train(make_ctx, "standard", optim=optim).history
    return [r["lr"] for r in history]


@pytest.mark.parametrize("schedule", ["multistep", "cosine", "constant"])
def test_lr_schedule(make_ctx: Any, schedule: str) -> None:
    o = OptimParams(epochs=4, batch_size=16, lr=0.1, schedule=schedule, milestones=[1, 3], lr_gamma=0.5)
    if schedule == "multistep":     # x gamma once each milestone epoch has passed
        expected = [o.lr * o.lr_gamma ** sum(m <= e for m in o.milestones) for e in range(o.epochs)]
    elif schedule == "cosine":      # cosine annealing to 0 over the epochs
        expected = [o.lr * (1 + math.cos(math.pi * e / o.epochs)) / 2 for e in range(o.epochs)]
    else:
        expected = [o.lr] * o.epochs
    assert _lr_of_epochs(make_ctx, o) == pytest.approx(expected, rel=1e-6)


def test_non_finite_loss_stops_training(make_ctx: Any) -> None:
    class Diverging(OBJECTIVES.get("standard")):  # type: ignore[misc, valid-type]
        def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
            out = super().loss(model, x, y)
            return StepOutput(out.loss * float("nan"), out.logits)

    with pytest.raises(FloatingPointError, match=r"training loss became nan at epoch 1, batch 1/4: .*optim.lr"):
        _train(make_ctx, objective_cls=Diverging)


def test_a_loss_gone_non_finite_stops_within_the_epoch(make_ctx: Any, tmp_path: Path) -> None:
    """A long epoch is not run to its end on nan weights: the flag is read every NONFINITE_CHECK_EVERY steps."""
    from pipeline_lib.training.loop import NONFINITE_CHECK_EVERY

    class InfFromStep2(OBJECTIVES.get("standard")):  # type: ignore[misc, valid-type]
        calls = 0

        def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
            type(self).calls += 1
            out = super().loss(model, x, y)
            return StepOutput(out.loss * (float("inf") if type(self).calls >= 2 else 1.0), out.logits)

    x, y = _data(4 * (NONFINITE_CHECK_EVERY + 6), 1)
    loader = BatchLoader(x, y, 4, shuffle=True, drop_last=True, seed=0)        # NONFINITE_CHECK_EVERY + 6 steps
    obj = InfFromStep2(InfFromStep2.Params(), make_ctx(seed=0))
    state = tmp_path / "state.pt"
    with pytest.raises(FloatingPointError, match=rf"became inf at epoch 1, batch 2/{len(loader)}"):
        fit(obj.prepare_model(_model()), obj, loader, _loaders()[1], OPTIM, seed=0, state_path=state, progress=False)
    assert InfFromStep2.calls == NONFINITE_CHECK_EVERY and not state.exists()


# --------------------------------------------------------------------------- mode hygiene
def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _bn_stats(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for n, b in model.named_buffers() if "running" in n]


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("setup", ["train", "eval", "mixed"])
def test_adversarial_restores_modes(make_ctx: Any, tiny_model: nn.Module,
                                    tiny_batch: tuple[torch.Tensor, torch.Tensor], bn_mode: str, setup: str) -> None:
    x, y = tiny_batch
    ctx: ObjectiveContext = make_ctx(bn_mode=bn_mode)
    objective = build_objective("pgd_at", None, ctx)
    tiny_model.train(setup != "eval")
    if setup == "mixed":
        tiny_model.block2.eval()
    before, stats = _modes(tiny_model), _bn_stats(tiny_model)
    objective.adversarial(tiny_model, x, y)
    assert _modes(tiny_model) == before
    moved = any(not torch.equal(a, b) for a, b in zip(stats, _bn_stats(tiny_model), strict=True))
    assert moved == (bn_mode == "train"), "the attack uses BN batch statistics exactly when bn_mode is train"


def test_the_loop_trains_in_train_mode_around_an_eval_mode_attack(make_ctx: Any) -> None:
    """PGD-AT attacks in eval mode inside loss(); the update that follows must see train mode again."""
    modes: list[tuple[bool, bool]] = []

    class Spy(OBJECTIVES.get("pgd_at")):  # type: ignore[misc, valid-type]
        def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
            before = model.training
            out = super().loss(model, x, y)
            modes.append((before, all(m.training for m in model.modules())))
            return out

    _train(make_ctx, objective_cls=Spy, optim=OptimParams(epochs=1, batch_size=16, lr=0.05))
    assert modes and all(before and after for before, after in modes)


# --------------------------------------------------------------------------- run_training end to end
def _outputs(d: Path) -> TrainOutputs:
    return TrainOutputs(d / "model.pt", d / "metrics.json", d / "history.csv", d / "state" / "pretrain.pt")


def test_run_training_writes_every_output_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion_mnist(tmp_path / "data", n_train=128, n_test=64)
    p = tiny_params(tmp_path / "data")
    job = pretrain_job(p.pretrain.optim, p.threat)
    steps_per_epoch = p.data.n_train // job.optim.batch_size  # type: ignore[operator]

    ref = _outputs(tmp_path / "ref")
    metrics = train(p, job, ref)
    assert read_json(ref.metrics) == metrics and metrics["epochs"] == job.optim.epochs
    assert 0 <= metrics["val_clean_acc"] <= 1 and metrics["train_time_s"] > 0
    with open(ref.history, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == list(range(1, job.optim.epochs + 1))
    model, meta = checkpoint.load_model(ref.checkpoint)
    assert meta["method"] == "standard" and meta["config"]["optim"]["lr"] == job.optim.lr
    assert not ref.state.exists(), "the resume state is removed once the checkpoint exists"

    # Killed in the last epoch, then run again: it resumes and ends with the same weights.
    standard = OBJECTIVES.get("standard")
    original = standard.loss
    calls = {"n": 0, "die_at": steps_per_epoch * (job.optim.epochs - 1) + 2}

    def counted(self: Objective, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise SimulatedKill
        return original(self, m, x, y)

    run = _outputs(tmp_path / "run")
    monkeypatch.setattr(standard, "loss", counted)
    with pytest.raises(SimulatedKill):
        train(p, job, run)
    assert not run.checkpoint.exists() and checkpoint.load(run.state)["epoch"] == job.optim.epochs - 1
    calls.update(n=0, die_at=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)     # the state matches: no "ignoring" warning
        resumed = train(p, job, run)
    assert calls["n"] == steps_per_epoch                     # only the last epoch ran again
    assert resumed["val_clean_acc"] == metrics["val_clean_acc"]
    assert _same_weights(checkpoint.load_model(run.checkpoint)[0], model)
