"""Device choice, seeding and model-mode bookkeeping shared by every stage."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UserError


class RuntimeConfigError(UserError, ValueError):
    """runtime.* asks for what this machine cannot do (a GPU, bf16); the message names the key and the fix."""


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU. An explicit 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeConfigError(f"runtime.device={name!r} but torch sees no CUDA device on this machine "
                                 "(torch.cuda.is_available() is False); set runtime.device: auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Called at every epoch start too,
    with a seed derived from (seed, epoch), so a resumed run replays the same batches."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels: bit-identical metrics on a machine at some speed cost on GPU.

    On CPU this changes nothing measurable. On CUDA, `deterministic: true` turns cuDNN
    autotuning off (benchmark=False: a fixed, not necessarily fastest, convolution algorithm),
    asks cuDNN for deterministic algorithms only, makes cuBLAS use a fixed workspace and
    warns on any op without a deterministic implementation (e.g. some scatter/index_add
    backward kernels): reruns give the same weights bit for bit. `deterministic: false`
    lets cuDNN benchmark the algorithms per input shape on the first batches and pick the
    fastest (the usual setting for speed; measure the gain on your GPU), but the chosen
    algorithms and atomics-based kernels then make runs differ in the last bits, which
    grows into different weights within an epoch: two such runs agree only statistically
    (docs/gpu.md).
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        _deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        _deterministic_algorithms(False)


def _deterministic_algorithms(mode: bool, warn_only: bool = False) -> None:
    """`torch.use_deterministic_algorithms` without its import of torch._inductor (2-3 s per stage process
    on a 2-core CPU, measured): that import only sets inductor's own flag, which matters to torch.compile,
    which the project does not use. When inductor is already loaded (a caller compiles), the public
    function sets both."""
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


def check_amp(amp: str, device: torch.device) -> None:
    """Fail before any work when `runtime.amp` cannot run on `device` (message names both)."""
    if amp == "none":
        return
    if amp != "bf16":
        raise RuntimeConfigError(f"runtime.amp={amp!r} is not supported; use 'none' or 'bf16'")
    if not torch.amp.is_autocast_available(device.type):
        raise RuntimeConfigError(f"runtime.amp=bf16: torch has no autocast for device {device}; use amp: none")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeConfigError(f"runtime.amp=bf16: {torch.cuda.get_device_name(device)} has no bf16 support "
                         "(needs compute capability >= 8.0, e.g. A100/H100/RTX 30xx); use amp: none")


def autocast(amp: str, device: torch.device) -> AbstractContextManager[Any]:
    """The mixed-precision context for a training step: bf16 autocast, or nothing (amp='none').

    bf16 keeps fp32's exponent range, so no loss scaling is needed (unlike fp16). Autocast
    runs convolutions and matmuls in bf16 and keeps reductions, softmax and losses in fp32;
    parameters, gradients and optimizer state stay fp32. On CPU torch's CPU autocast is used:
    correct everywhere, faster only on CPUs with native bf16 (AVX512-BF16 / AMX).
    """
    check_amp(amp, device)
    if amp == "none":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def memory_format(channels_last: bool) -> torch.memory_format:
    """NHWC (channels_last) lets cuDNN use tensor-core convolution kernels without transposes."""
    return torch.channels_last if channels_last else torch.contiguous_format


@contextmanager
def preserve_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's train/eval flag on exit (not only the root's:
    a frozen sub-network may be deliberately in eval mode inside a training model)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block and restore its previous modes after."""
    with preserve_mode(model):
        model.eval()
        yield model


@contextmanager
def frozen_params(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off requires_grad on parameters for the block (attacks need input gradients only)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
