"""FGSM (Goodfellow et al., 2015): one signed-gradient step of size eps, in pixel space.

It is PGD with a single step of length eps and no random start, so it reuses
`pgd_linf` (same projection, clamping and input-only gradients).
"""

from __future__ import annotations

from torch import Tensor, nn

from .pgd import LossFn, ce_loss, pgd_linf


def fgsm_linf(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, loss_fn: LossFn = ce_loss) -> Tensor:
    """x_adv = clamp(x + eps * sign(grad_x loss), 0, 1); x: (B, C, H, W) in [0, 1], y: (B,) int64.

    Never changes the model's mode and never touches parameter gradients.
    """
    if eps <= 0:
        raise ValueError(f"FGSM needs eps > 0, got eps={eps}")
    return pgd_linf(model, x, y, eps=eps, step_size=eps, steps=1, random_start=False, loss_fn=loss_fn)
