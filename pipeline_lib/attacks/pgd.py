"""L-inf projected gradient descent in pixel space ([0, 1] images).

The attack never changes the model's train/eval mode (the caller chooses it:
AR-AT attacks in train mode through its adversarial BN, TRADES-style code in
eval mode) and never accumulates parameter gradients: it differentiates the loss
with respect to the input only (`torch.autograd.grad`), so it can run in the
middle of a training step without touching `.grad`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# loss_fn(logits (B, K), y (B,)) -> per-example loss (B,), to be *maximised*
LossFn = Callable[[Tensor, Tensor], Tensor]


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def cw_margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin: max_{k != y} z_k - z_y (maximised by the attack)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - true


def uniform_start(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """x + U(-eps, eps), clamped to [0, 1]. The noise is drawn on the generator's device."""
    gdev = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
    return (x + (2 * noise - 1) * eps).clamp_(0, 1)


def pgd_linf(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, step_size: float, steps: int,
             random_start: bool = True, loss_fn: LossFn = ce_loss, restarts: int = 1,
             generator: torch.Generator | None = None, x_init: Tensor | None = None,
             project_init: bool = True) -> Tensor:
    """Return x_adv with ||x_adv - x||_inf <= eps and x_adv in [0, 1].

    With restarts > 1 each example keeps the first restart that fools the model
    (else the last), as in Madry et al.'s evaluation. `x_init` replaces the
    random start (e.g. TRADES' x + 0.001 N(0, 1)); it is projected onto the ball and [0, 1]
    first unless `project_init` is false (the official TRADES / MART / CURE attacks: the first
    forward sees the raw start, every later iterate is projected)
    x: (B, C, H, W) in [0, 1]; y: (B,) int64.
    """
    if eps < 0 or step_size <= 0 or steps < 0 or restarts < 1:
        raise ValueError(f"bad PGD settings eps={eps} step_size={step_size} steps={steps} restarts={restarts}")
    x = x.detach()
    best = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        if x_init is not None:
            x_adv = x_init.detach().clone()
            if project_init:
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
        else:
            x_adv = uniform_start(x, eps, generator) if random_start else x.clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():  # callers may sit inside torch.no_grad() (evaluation loops)
                loss = loss_fn(model(x_adv), y).sum()
                (grad,) = torch.autograd.grad(loss, [x_adv])
            with torch.no_grad():
                x_adv = x_adv + step_size * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
        if steps == 0 and not project_init:   # no iterate was projected: the result still must be
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
        x_adv = x_adv.detach()
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            now_fooled = model(x_adv).argmax(1) != y
        take = ~fooled  # examples not yet fooled take this restart's result
        best[take] = x_adv[take]
        fooled |= now_fooled
    return best
