"""PGD adversarial training (Madry et al., 2018): CE on PGD examples only."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Objective, StepOutput, register_objective


@register_objective("pgd_at")
class PGDAT(Objective):
    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        x_adv = self.adversarial(model, x, y)
        logits = model(x_adv)
        return StepOutput(F.cross_entropy(logits, y), logits)
