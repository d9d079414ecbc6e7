"""Clean accuracy in eval mode."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..runtime import evaluating


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Argmax predictions (N,) for x (N, C, H, W), in eval mode, mode restored after."""
    with evaluating(model):
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 accuracy (fraction) over (x, y) batches, in eval mode, mode restored after."""
    correct = total = 0
    with evaluating(model):
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)
