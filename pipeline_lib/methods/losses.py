"""Loss pieces shared by several objectives (no objective is registered here).

* `kl_per_example`   KL(p || q) between two softmax outputs, per example (TRADES, MART, CURE).
* `distance`         per-example distances between representations: cosine, angle, l2 (ARREST).
* `angle`            the angle between two representations, in radians (ARREST's noisy replay).
* `gaussian_start`   the TRADES / MART attack start x + std * N(0, 1).

Shapes: logits (B, K), representations (B, D), images (B, C, H, W); every
per-example function returns (B,).
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from ..method_params.arrest import DistanceName

DISTANCES: tuple[str, ...] = get_args(DistanceName)

# Below this norm a representation counts as zero for the cosine / angle (all-dead ReLU features):
# F.normalize then returns 0 instead of dividing by ~0.
_NORM_EPS = 1e-12


def kl_per_example(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(softmax(logits_p) || softmax(logits_q)), (B, K), (B, K) -> (B,).

    Computed from log-softmaxes (`log_target=True`), so saturated probabilities
    stay finite. Gradients flow into both arguments, as in the official TRADES
    and MART code, which train through p(x) too; detach an argument to stop them.
    `.mean()` of the result is PyTorch's `reduction="batchmean"`.
    """
    if logits_p.shape != logits_q.shape or logits_p.ndim != 2:
        raise ValueError(f"kl_per_example needs two (B, K) logits of the same shape, got "
                         f"{tuple(logits_p.shape)} and {tuple(logits_q.shape)}")
    log_p = F.log_softmax(logits_p, dim=1)
    log_q = F.log_softmax(logits_q, dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1)


def angle(a: Tensor, b: Tensor) -> Tensor:
    """Angle in radians in [0, pi] between the rows of a and b, (B, D), (B, D) -> (B,).

    Uses 2 * atan2(|a^ - b^|, |a^ + b^|) on the unit vectors instead of
    acos(cos): acos loses all precision near 0 (cos = 1 - 1e-7 already reads as
    0.03 degrees) and has an infinite gradient there, while this form is exact
    and has a zero (sub)gradient at a == b.
    """
    _check_pair(a, b)
    a_hat = F.normalize(a, dim=1, eps=_NORM_EPS)
    b_hat = F.normalize(b, dim=1, eps=_NORM_EPS)
    return 2 * torch.atan2((a_hat - b_hat).norm(dim=1), (a_hat + b_hat).norm(dim=1))


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cos(a, b) per row, (B, D), (B, D) -> (B,), in [0, 2]."""
    _check_pair(a, b)
    return 1 - (F.normalize(a, dim=1, eps=_NORM_EPS) * F.normalize(b, dim=1, eps=_NORM_EPS)).sum(1)


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distance averaged over the D features, (B, D), (B, D) -> (B,).

    The mean over features (not the sum) keeps one lambda meaningful across
    architectures with different feature widths.
    """
    _check_pair(a, b)
    return (a - b).pow(2).mean(1)


def distance(name: DistanceName, a: Tensor, b: Tensor) -> Tensor:
    """The per-example distance `name` (cosine | angle | l2) between the rows of a and b: (B,)."""
    if name == "cosine":
        return cosine_distance(a, b)
    if name == "angle":
        return angle(a, b)
    if name == "l2":
        return l2_distance(a, b)
    raise ValueError(f"unknown distance {name!r}; known: {', '.join(DISTANCES)}")


def gaussian_start(x: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    """x + std * N(0, 1), the start point of the TRADES and MART attacks (not clamped here:
    `pgd_linf` projects its `x_init` onto the eps-ball and [0, 1] unless `project_init` is false). Noise is drawn on
    the generator's device, so a CPU generator gives the same start on every device."""
    if std < 0:
        raise ValueError(f"gaussian_start: std must be >= 0, got {std}")
    gdev = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
    return x.detach() + std * noise


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (B, D) representations of the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
