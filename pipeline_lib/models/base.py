"""The contract every model in the registry honours.

* Inputs are images in [0, 1], shape (B, C, H, W); normalisation happens inside
  the model (`Normalize`), so attacks and eps are defined in pixel space, as in RobustBench.
* `forward_features(x) -> (B, D)` is the penultimate representation h(x) that
  ARREST distils and compares; `forward_head(h) -> (B, num_classes)` the logits.
* Inner layers have stable dotted names (`model.named_modules()`) so objectives
  such as AR-AT can hook them by name; `feature_layers()` names the last stage's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean/std as buffers so they move with the model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """Base class: subclasses implement `features` (normalised input -> (B, D)) and set `head`."""

    feature_dim: int
    head: nn.Module

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)

    def features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, feature_dim) penultimate representation."""
        return self.features(self.normalize(x))

    def forward_head(self, h: Tensor) -> Tensor:
        """(B, feature_dim) -> (B, num_classes) logits."""
        return self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def feature_layers(self) -> list[str]:
        """Dotted module names of the model's last-stage feature layers, in forward order (what timm's
        `feature_info` declares): the intermediate representations an objective such as AR-AT regularises."""
        raise NotImplementedError(f"{type(self).__name__} declares no feature layers")
