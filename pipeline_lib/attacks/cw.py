"""CW-inf: L-inf PGD on the Carlini-Wagner margin loss.

This is the "C&W" row of the TRADES / MART / CURE evaluation tables: PGD
(random start, signed steps, projection) maximising max_{k != y} z_k - z_y
instead of the cross-entropy. Their code clamps the margin at kappa = 50, which
never binds before an example is misclassified, so the unclamped margin
(`cw_margin_loss`) gives the same attack.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .pgd import cw_margin_loss, pgd_linf


def cw_linf(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, step_size: float, steps: int,
            restarts: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """x_adv with ||x_adv - x||_inf <= eps in [0, 1]; x: (B, C, H, W), y: (B,) int64."""
    return pgd_linf(model, x, y, eps=eps, step_size=step_size, steps=steps, restarts=restarts,
                    loss_fn=cw_margin_loss, generator=generator)
