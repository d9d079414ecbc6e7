"""Device choice, seeding and model-mode bookkeeping shared by every stage."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU. An explicit 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but no CUDA device is available")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Called at every epoch start too,
    with a seed derived from (seed, epoch), so a resumed run replays the same batches."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels: bit-identical metrics on a machine at some speed cost on GPU.

    On CPU this changes nothing measurable. On CUDA it disables cuDNN autotuning
    (benchmark=False) and asks for deterministic algorithms; `deterministic: false`
    in params turns autotuning on for speed and gives up run-to-run identity.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        torch.use_deterministic_algorithms(False)


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
