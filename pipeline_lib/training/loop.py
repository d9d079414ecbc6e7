"""The one training loop every method shares.

    for epoch:
        objective.on_epoch_start
        for (x, y) in loader:                # x: (B, C, H, W) in [0, 1]
            with autocast(amp):               # bf16 autocast: the whole loss, attack included
                loss = objective.loss(model, x, y).loss
            loss.backward()
            average_gradients                 # several processes: gradient of the global batch
            objective.before_optimizer_step   # e.g. CURE's gradient mask
            optimizer.step()
            objective.after_optimizer_step    # e.g. CURE's revision EMA
        scheduler.step(); objective.on_epoch_end; clean val accuracy
        save resumable state (atomic)

Determinism and resume: every epoch re-seeds torch/numpy/python, the loader's
order and the objective's attack generator from (seed, epoch). So a run killed
after epoch k and resumed from its state file replays epochs k+1.. exactly as
the uninterrupted run would, and produces identical weights.

Several processes (pipeline_lib.distributed): each rank's loader yields its share of every
global batch; gradients are averaged over the ranks after the backward and before the
objective's gradient hook; the epoch's statistics are summed over the ranks, so the logged
record is the global one; the attack-noise generator gets a per-rank stream (independent
noise per shard) while everything else (model init, revision coins) is identical on every
rank; only rank 0 writes the resume state and calls `on_epoch`.
"""

from __future__ import annotations

import bisect
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint, distributed
from ..config import OptimParams
from ..data import BatchLoader
from ..errors import UserError
from ..evaluation.accuracy import accuracy
from ..methods import Objective
from ..runtime import autocast, seed_everything

STATE_FORMAT = "arpipe-train-state/1"
NONFINITE_CHECK_EVERY = 10   # steps between host reads of the non-finite-loss flag (one process)


@dataclass
class FitResult:
    model: nn.Module                                     # the trained model (training form)
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0


class TrainingDivergedError(UserError, FloatingPointError):
    """The training loss became nan or inf; the message names where and the likely cause."""


def diverged(desc: str, epoch: int, batch: int, n_batches: int, loss: float, o: OptimParams) -> TrainingDivergedError:
    """The error for a non-finite loss at (0-based) `epoch`, `batch` (-1: not seen on this rank)."""
    where = f"epoch {epoch + 1}, batch {batch + 1}/{n_batches}" if batch >= 0 else f"epoch {epoch + 1}"
    return TrainingDivergedError(
        f"{desc}: the training loss became {loss} at {where}: training diverged, nothing of this epoch was "
        f"saved; the usual cause is a step too large: lower optim.lr (now {o.lr:g}) or optim.weight_decay "
        f"(now {o.weight_decay:g})")


def make_optimizer(params: list[nn.Parameter], o: OptimParams) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)


def make_scheduler(opt: torch.optim.Optimizer, o: OptimParams) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: multistep (x lr_gamma at each milestone), cosine to 0, or constant;
    with `first_epoch_lr` the first epoch (index 0) runs at that lr instead (a one-epoch warm-up),
    the later epochs at the schedule's own lr, written in closed form."""
    if o.first_epoch_lr is not None:
        first = o.first_epoch_lr / o.lr

        def factor(e: int) -> float:
            if e == 0:
                return first
            if o.schedule == "multistep":
                return o.lr_gamma ** bisect.bisect_right(o.milestones, e)
            if o.schedule == "cosine":
                return (1 + math.cos(math.pi * e / o.epochs)) / 2
            return 1.0

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if o.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(o.milestones), gamma=o.lr_gamma)
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o.epochs)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 10_007 + epoch


def attack_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of the objective's attack-noise generator for (epoch, rank): rank 0 has the single-process
    stream; other ranks draw independent noise for their shards."""
    return epoch_seed(seed, epoch) + 1 + 1_000_003 * rank


def fit(model: nn.Module, objective: Objective, loader: BatchLoader, val: BatchLoader, optim: OptimParams, *,
        seed: int, state_path: str | Path | None = None, fingerprint: str = "", progress: bool = True,
        desc: str = "train", on_epoch: Callable[[dict[str, float]], None] | None = None,
        amp: str = "none") -> FitResult:
    """Train `model` (already prepared by `objective.prepare_model` and on its device).

    `state_path`: where the resumable state is written after each epoch; if a
    state with the same `fingerprint` exists there, training resumes from it.
    `on_epoch(record)` is called with each epoch's metrics (also replayed ones).
    `amp`: 'bf16' runs each step's loss (attack generation included) under bf16 autocast.
    In a process group (see the module docstring) every rank calls fit with its shard loader.
    """
    device = next(model.parameters()).device
    extra = objective.extra_modules().to(device)
    params = [p for p in model.parameters() if p.requires_grad] + [p for p in extra.parameters() if p.requires_grad]
    opt = make_optimizer(params, optim)
    sched = make_scheduler(opt, optim)
    history: list[dict[str, float]] = []
    start = 0
    rank, main = distributed.rank(), distributed.is_main_process()
    single = distributed.world_size() == 1   # mid-epoch stops only alone: ranks must leave the epoch together
    distributed.broadcast_module_(model)   # identical starting weights on every rank (no-op in one process)
    distributed.broadcast_module_(extra)

    state = None
    if main and state_path is not None:
        state = checkpoint.load_resume_state(state_path)   # unreadable: moved aside, training starts afresh
    state = distributed.broadcast_object(state)   # rank 0 reads; a shared filesystem is not required
    if state is not None:
        if state.get("format") == STATE_FORMAT and state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            extra.load_state_dict(state["extra"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            objective.load_state_dict(state["objective"])
            history = list(state["history"])
            start = int(state["epoch"])
        elif main:
            warnings.warn(f"ignoring {state_path}: it belongs to a different configuration", RuntimeWarning,
                          stacklevel=2)
    for record in history:
        if on_epoch and main:
            on_epoch(record)

    step = start * len(loader)
    for epoch in range(start, optim.epochs):
        t0 = time.perf_counter()
        seed_everything(epoch_seed(seed, epoch))
        loader.set_epoch(epoch)
        objective.ctx.generator.manual_seed(attack_seed(seed, epoch, rank))
        record: dict[str, float] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"]}
        # Whole global batches: per-epoch work (AR-AT's balance accuracy) sees the same examples on every rank.
        record.update(objective.on_epoch_start(model, epoch, loader.unsharded()))

        model.train()
        extra.train()
        sums: dict[str, torch.Tensor | float] = {}   # stat -> sum of batch mean x batch size (tensors on the device)
        seen = 0
        # Batch index of the epoch's first non-finite loss (-1: none) and that loss, kept on the device
        # so no step waits for the host; read every NONFINITE_CHECK_EVERY steps (one process) and at the end.
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        bad_loss = torch.zeros((), device=device)
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{optim.epochs}", disable=not (progress and main), leave=False,
                   mininterval=1.0)
        for i, (x, y) in enumerate(bar):
            opt.zero_grad(set_to_none=True)
            with autocast(amp, device):
                out = objective.loss(model, x, y)
            out.loss.backward()
            newly_bad = (first_bad < 0) & ~torch.isfinite(out.loss.detach())
            first_bad = torch.where(newly_bad, i, first_bad)
            bad_loss = torch.where(newly_bad, out.loss.detach().float(), bad_loss)
            if single and (i + 1) % NONFINITE_CHECK_EVERY == 0 and bool(first_bad >= 0):
                raise diverged(desc, epoch, int(first_bad), len(loader), float(bad_loss), optim)
            distributed.average_gradients(params)   # before the objective's gradient hook (CURE's mask)
            objective.before_optimizer_step(model)
            opt.step()
            step += 1
            objective.after_optimizer_step(model, step)
            b = len(y)
            seen += b
            batch_stats: dict[str, Any] = {"train_loss": out.loss.detach(), **out.stats}
            if out.logits is not None:
                batch_stats["train_acc"] = (out.logits.detach().argmax(1) == y).float().mean()
            for k, v in batch_stats.items():
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"{objective.name}: stat {k!r} is a {type(v).__name__}, not a tensor; return "
                                    "batch statistics as detached tensors (a Python number waits for the device)")
                # summed where it lives, in its own dtype: read once per epoch, by all_reduce_sum
                sums[k] = sums.get(k, 0.0) + v.detach() * b
        sched.step()
        totals = distributed.all_reduce_sum({**sums, "_seen": float(seen)}, device)   # global over the ranks
        seen_all = totals.pop("_seen")
        record.update({k: v / max(seen_all, 1.0) for k, v in totals.items()})
        distributed.average_unsynced_bn_buffers_(model)   # runtime.sync_bn: false keeps per-rank statistics
        if not math.isfinite(record["train_loss"]):   # global over the ranks: every rank stops here together
            raise diverged(desc, epoch, int(first_bad), len(loader), float(bad_loss) if first_bad >= 0
                           else record["train_loss"], optim)
        record.update(objective.on_epoch_end(model, epoch))
        record["val_clean_acc"] = accuracy(model, val)
        record["epoch_time_s"] = time.perf_counter() - t0
        history.append(record)
        if state_path is not None and main:
            checkpoint.save(state_path, {
                "format": STATE_FORMAT, "fingerprint": fingerprint, "epoch": epoch + 1,
                "model": model.state_dict(), "extra": extra.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "objective": objective.state_dict(), "history": history})
        if on_epoch and main:
            on_epoch(record)
    return FitResult(model=model, history=history, resumed_from_epoch=start)
