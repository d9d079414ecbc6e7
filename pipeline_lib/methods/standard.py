"""Standard (natural) training: cross-entropy on clean inputs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Objective, StepOutput, register_objective


@register_objective("standard")
class Standard(Objective):
    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        logits = model(x)
        return StepOutput(F.cross_entropy(logits, y), logits)
