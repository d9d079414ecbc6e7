"""Multi-process training over torch.distributed: launch, ranks, collectives, synchronised BatchNorm.

How a multi-process training stage runs (docs/gpu.md):

    arpipe finetune arat ...            params: runtime.nproc_per_node (x runtime.nnodes) > 1
      -> relaunch(): python -m torch.distributed.run ... -m stages.cli finetune arat ...
         each process: process_group() -> DistInfo(rank, world_size, local_rank), device cuda:<local_rank>
         BatchLoader(rank, world_size): this rank's contiguous 1/world of every global batch, from the
             same globally shuffled order, so the ranks' shards together are the single-process batch
         sync_batchnorm(model): BatchNorm statistics of the global batch, not of the shard
         the loop: loss -> backward -> average_gradients() -> objective.before_optimizer_step -> step
         rank 0 alone writes checkpoints, metrics, history and logs to MLflow

Why an explicit gradient all-reduce instead of wrapping the model in DistributedDataParallel:
objectives call `model.forward_features`, hook named modules, switch split-BN branches, run
several forwards (attack, clean, adversarial, revision model) and take `torch.autograd.grad`
(PGD, CURE's RGP) before the loop's backward. A DDP wrapper exposes none of the model's methods,
needs `find_unused_parameters` / static-graph care for multiple forwards, and fires its
gradient hooks in ways that depend on the objective. Averaging `.grad` once after the backward
is exactly the data-parallel gradient for every objective, whatever it does inside `loss()`,
and it runs *before* `before_optimizer_step`, so a gradient mask (CURE) sees the global
gradient. The price is no overlap of communication with the backward pass: one bucketed
all-reduce per step, small next to an adversarial step's 11 forward/backward passes.

Everything here is a no-op in a single process, so library code may call it unconditionally.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# Environment variables torchrun sets in every process it starts.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Gradients are all-reduced in flat buckets of at most this many bytes (fewer, larger messages).
_BUCKET_BYTES = 64 * 2**20


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# -- state -------------------------------------------------------------------------------------
def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, else torchrun's RANK (e.g. after the group is
    destroyed), else 0."""
    if is_distributed():
        return dist.get_rank()
    return int(os.environ["RANK"]) if under_launcher() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def under_launcher() -> bool:
    """True in a process started by torchrun (or any launcher that sets its variables)."""
    return all(k in os.environ for k in _TORCHRUN_ENV)


# -- launching ---------------------------------------------------------------------------------
def launch_needed(nproc_per_node: int, nnodes: int) -> bool:
    """Whether a stage asked for several processes must re-execute itself under torchrun."""
    return nproc_per_node * nnodes > 1 and not under_launcher()


def launch_command(argv: Sequence[str], *, nproc_per_node: int, nnodes: int, rdzv_endpoint: str,
                   run_id: str, module: str = "stages.cli") -> list[str]:
    """The torchrun command that runs `python -m <module> <argv>` in nproc_per_node x nnodes processes.

    One node: `--standalone` (a private rendezvous on a free port, so several stages can run
    side by side). Several nodes: every node runs the same stage command; they meet at the c10d
    rendezvous `rdzv_endpoint` under the id `run_id` (the stage name, identical on every node).
    """
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError(f"nproc_per_node={nproc_per_node} and nnodes={nnodes} must be >= 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={safe_run_id(run_id)}"]
    return [*cmd, "-m", module, *argv]


def safe_run_id(name: str) -> str:
    """A rendezvous id from a stage name ('finetune@arat' -> 'finetune-arat')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "arpipe"


def relaunch(argv: Sequence[str], *, nproc_per_node: int, nnodes: int, rdzv_endpoint: str, run_id: str) -> int:
    """Run this stage command again under torchrun and return its exit code."""
    cmd = launch_command(argv, nproc_per_node=nproc_per_node, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                         run_id=run_id)
    print(f"launching {nproc_per_node * nnodes} processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=False).returncode


# -- the process group -------------------------------------------------------------------------
def backend_for(device_type: str, requested: str = "auto") -> str:
    """nccl for CUDA, gloo for everything else (CPU), unless a backend is requested explicitly."""
    if requested != "auto":
        return requested
    return "nccl" if device_type == "cuda" else "gloo"


def device_for(name: str, info: DistInfo) -> torch.device:
    """The device of this process: CUDA processes use GPU `local_rank`; 'cpu' stays CPU.

    `name` is runtime.device. With several processes per node an explicit 'cuda:N' would put
    every process on one GPU, so it is an error.
    """
    from .runtime import resolve_device

    device = resolve_device(name)
    if not info.enabled:
        return device
    if device.type == "cuda":
        if name.startswith("cuda:"):
            raise ValueError(f"runtime.device={name!r} pins every process to one GPU; use 'auto' or 'cuda' "
                             "with runtime.nproc_per_node > 1 (each process takes GPU LOCAL_RANK)")
        if info.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={info.local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return device


@contextmanager
def process_group(device_name: str = "auto", backend: str = "auto") -> Iterator[DistInfo]:
    """Join the process group torchrun prepared (from its environment variables) for the block.

    Outside torchrun, or when a group is already initialised (tests that manage their own),
    it yields the current ranks and initialises / destroys nothing.
    """
    if dist.is_initialized() or not under_launcher() or int(os.environ["WORLD_SIZE"]) == 1:
        yield DistInfo(rank(), world_size(), int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0)
        return
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    device = device_for(device_name, info)
    dist.init_process_group(backend_for(device.type, backend))
    try:
        yield info
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# -- collectives -------------------------------------------------------------------------------
def _buckets(tensors: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Consecutive groups of same-dtype, same-device tensors of at most _BUCKET_BYTES each."""
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > _BUCKET_BYTES or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def all_reduce_mean_(tensors: Iterable[Tensor]) -> None:
    """Average each tensor over the ranks, in place (flattened into buckets: few messages).
    A no-op in a single process."""
    if not is_distributed():
        return
    tensors = list(tensors)
    w = dist.get_world_size()
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])   # (sum of numels,)
        dist.all_reduce(flat)
        flat.div_(w)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average `.grad` over the ranks: the gradient of the global-batch mean loss.

    Every rank runs the same graph, so a parameter without a gradient has none on every rank.
    """
    all_reduce_mean_([p.grad for p in params if p.grad is not None])


@torch.no_grad()
def all_reduce_sum(values: dict[str, Tensor | float], device: torch.device) -> dict[str, float]:
    """Sum scalar statistics over the ranks (one float64 message); plain floats on every rank, in
    the input's key order. Every rank must pass the same keys."""
    if not values:
        return {}
    keys = sorted(values)   # the message layout must not depend on a rank's insertion order
    flat = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).reshape(()).to(device) for k in keys])
    if is_distributed():
        dist.all_reduce(flat)
    summed = dict(zip(keys, flat.tolist(), strict=True))
    return {k: summed[k] for k in values}


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (identical starting weights)."""
    if not is_distributed():
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank (e.g. a resume state read by rank 0 only)."""
    if not is_distributed():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src)
    return box[0]


@torch.no_grad()
def average_unsynced_bn_buffers_(module: nn.Module) -> None:
    """Average the running statistics of BatchNorms that are *not* synchronised (runtime.sync_bn:
    false), so every rank - and the checkpoint rank 0 writes - holds the same model."""
    if not is_distributed():
        return
    stats = [b for m in module.modules() if isinstance(m, _BatchNorm) and not _is_synced(m)
             for b in (m.running_mean, m.running_var) if b is not None]
    all_reduce_mean_(stats)


# -- synchronised BatchNorm --------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: y = sum_r x_r on every rank; dL/dx_r = sum_r' dL_r'/dy."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # noqa: ARG004 - autograd signature
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: ARG004
        g = grad.clone()
        dist.all_reduce(g)
        return g


def all_reduce_sum_differentiable(x: Tensor) -> Tensor:
    return _AllReduceSum.apply(x) if is_distributed() else x


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch, on any backend.

    torch.nn.SyncBatchNorm refuses CPU tensors; this one all-reduces per-channel sums with a
    differentiable all-reduce (gloo works), so gradients through the statistics reach every
    rank's inputs exactly as in one process. Input (B, C, *) with any number of spatial dims.
    Eval mode, or a single process: exactly torch's BatchNorm.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dims (B, C, ...), got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        xf = x.float()                                            # statistics in fp32, also under autocast
        count = x.new_full((1,), x.numel() // x.shape[1], dtype=torch.float32)
        sums = all_reduce_sum_differentiable(torch.cat([xf.sum(dims), count]))   # (C + 1,)
        n = sums[-1].detach()
        mean = sums[:-1] / n                                      # (C,)
        centred = xf - mean.view(shape)
        var = all_reduce_sum_differentiable(centred.square().sum(dims)) / n   # biased, (C,)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None  # type: ignore[arg-type]
                          else self.momentum)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / (n - 1).clamp(min=1)), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def _is_synced(m: nn.Module) -> bool:
    return isinstance(m, AllReduceBatchNorm | nn.SyncBatchNorm)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm of `module` (in place where possible; returns the result) by a
    synchronised one: torch's SyncBatchNorm on CUDA, AllReduceBatchNorm elsewhere.

    The new modules reuse the old ones' parameter and buffer tensors (an optimizer built before
    still points at them) and keep their train/eval flags. BNs already synchronised are kept.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm) and not _is_synced(module):
        new = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, device=None)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
    for name, child in module.named_children():
        converted = _convert(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
