"""Shared fixtures: tiny synthetic data, a tiny model and objective contexts, all on CPU.

Tests never touch the real MLflow store (ARPIPE_MLFLOW=0 unless a test sets up
its own temporary store) and never send DVC analytics.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from pipeline_lib.attacks.training import AttackParams  # noqa: E402
from pipeline_lib.data import get_spec  # noqa: E402
from pipeline_lib.methods import ObjectiveContext  # noqa: E402
from pipeline_lib.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The test models are tiny: one intra-op thread is as fast, and far faster when the
# machine is shared (two threads per process oversubscribe a 2-core CI runner).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARPIPE_MLFLOW", "0")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def fmnist_spec():
    return get_spec("fashion_mnist")


@pytest.fixture
def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): 32 synthetic 28x28 grey images in [0, 1] whose class is visible (a bright band per class)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(32) % 10
    x = 0.3 * torch.rand(32, 1, 28, 28, generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, 0, 2 * c + 4: 2 * c + 7, :] += 0.6
    return x.clamp(0, 1), y


@pytest.fixture
def tiny_model(fmnist_spec):
    torch.manual_seed(0)
    return build_model("small_cnn", fmnist_spec)


@pytest.fixture
def make_ctx():
    """ObjectiveContext factory: make_ctx(teacher=None, eps=0.1, steps=2, ...)."""

    def _make(teacher=None, eps: float = 0.1, steps: int = 2, step_size: float = 0.05, bn_mode: str = "eval",
              seed: int = 0) -> ObjectiveContext:
        attack = AttackParams(eps=eps, step_size=step_size, steps=steps, bn_mode=bn_mode)
        return ObjectiveContext(attack=attack, num_classes=10, device=torch.device("cpu"), teacher=teacher,
                                seed=seed, generator=torch.Generator().manual_seed(seed))

    return _make
