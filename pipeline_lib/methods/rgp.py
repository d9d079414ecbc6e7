"""CURE's Robust Gradient Prominence (RGP) gradient mask (Gowda et al., ICLR 2024): two variants.

`variant="paper"` (the default). For every selected weight tensor w (one "layer"),

    RGP(w) = alpha * |dL_nat/dw| + (1 - alpha) * |dL_adv/dw|        (elementwise, shape of w)

with L_nat = CE(f(x), y) and L_adv the loss on the adversarial examples (see
`CURE.Params.rgp_adv_loss`). The gradient entries of the k weights with the
lowest RGP are zeroed before the optimizer step ("conserved"), the others are
updated; RGP is recomputed at every step. Per layer,

    k = floor(p / 100 * n + 1/2)       (n = w.numel(); round half up, clipped to [0, n])

and ties in RGP are broken by flat index (stable sort), so the zeroed set is
exactly `argsort(RGP.flatten(), stable=True)[:k]`.

As in the official code, only `.grad` is zeroed: SGD's weight decay and
momentum still move a conserved weight a little.

`variant="official"` (NeurAI-Lab/CURE, `--reinit_mode rgp_soft`, `RGP.fuse_grads`):

    S(w) = alpha * dL_nat/dw + (1 - alpha) * dL_adv/dw              (signed, no |.|)
    zeroed = { i : S_i < percentile(S, p) }       (numpy's linear-interpolation percentile)

and the selected tensors are `rgp_layers="conv1"`: every parameter whose name contains
`conv1` except the model's first parameter (the official `l > 0 and 'conv1' in name`; in
ResNet-18 / WRN-34-10 the first parameter is the stem `conv1.weight`, so only each residual
block's first conv is masked). The signed score zeroes the most *negative* entries, not the
least prominent ones; the two masks overlap little (Jaccard 0.04-0.07 on one batch). Which
variant produced the published numbers cannot be told from the official repository (its
README command passes flags its parser does not define, and its default `--reinit_mode ''`
masks nothing), so both are offered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from ..distributed import all_reduce_mean_
from ..method_params.cure import RGPLayers, RGPVariant
_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "conv_linear": (nn.modules.conv._ConvNd, nn.Linear),
    "conv": (nn.modules.conv._ConvNd,),
}


def select_weights(model: nn.Module, layers: RGPLayers, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the weight tensors RGP masks: `.weight` of every conv (and linear) module that
    requires grad, minus those whose parameter name matches a glob in `exclude` (e.g. 'head.*').
    `layers="conv1"` is the official selection instead: every trainable parameter whose name
    contains 'conv1', the model's first parameter (the stem) excluded.

    A pattern that matches none of the candidates is an error (a typo would otherwise silently
    mask the layer it meant to spare), and so is an empty selection.
    """
    if layers == "conv1":
        named = list(model.named_parameters())
        candidates = [n for i, (n, prm) in enumerate(named) if i > 0 and "conv1" in n and prm.requires_grad]
    elif layers in _KINDS:
        candidates = [f"{name}.weight" if name else "weight" for name, m in model.named_modules()
                      if isinstance(m, _KINDS[layers]) and m.weight is not None and m.weight.requires_grad]
    else:
        raise ValueError(f"unknown rgp_layers {layers!r}; choose one of {sorted([*_KINDS, 'conv1'])}")
    for pattern in exclude:
        if not any(fnmatchcase(c, pattern) for c in candidates):
            raise ValueError(f"rgp_exclude pattern {pattern!r} matches none of the {layers} weights: "
                             f"{', '.join(candidates)}")
    names = [c for c in candidates if not any(fnmatchcase(c, pat) for pat in exclude)]
    if not names:
        raise ValueError(f"RGP selects no weights (rgp_layers={layers!r}, rgp_exclude={list(exclude)}); "
                         f"candidates were: {', '.join(candidates) or 'none'}")
    return names


def masked_count(numel: int, p: float) -> int:
    """k = round-half-up(p% of numel), clipped to [0, numel]: how many gradient entries a layer loses."""
    if numel < 0 or not 0.0 <= p <= 100.0:
        raise ValueError(f"masked_count needs numel >= 0 and 0 <= p <= 100, got numel={numel} p={p}")
    return max(0, min(numel, math.floor(p * numel / 100.0 + 0.5)))


def prominence(loss_nat: Tensor, loss_adv: Tensor, weights: Sequence[Tensor], alpha: float,
               signed: bool = False) -> list[Tensor]:
    """RGP for each tensor in `weights` (same shapes), from the step's own graph:
    alpha |g_nat| + (1 - alpha) |g_adv|, or with `signed` (official variant) alpha g_nat + (1 - alpha) g_adv.

    Cost: the forward passes are the training step's own (retain_graph=True keeps them for the
    loop's backward), and `torch.autograd.grad` asks for the selected weights only, so nothing is
    accumulated into `.grad` and no gradient is formed for inputs, BN affine or bias parameters.
    That is one extra backward through f(x) for L_nat and one through the graph of L_adv
    (f(x_adv), and f(x) too for the KL form) - the unavoidable minimum, since two separate
    per-weight gradients cannot be recovered from the loop's single backward of their weighted
    sum. A term with zero weight (alpha = 0 or 1) is skipped. Measured on the small CNN (batch
    128, 5-step attack, CPU) a CURE step with RGP takes about 1.3x the step without it; the
    'ce' form of L_adv (adversarial graph only) is cheaper than 'kl' (both graphs).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"RGP alpha must be in [0, 1], got {alpha}")
    weights = list(weights)
    scores = [torch.zeros_like(w) for w in weights]
    for coef, loss in ((alpha, loss_nat), (1.0 - alpha, loss_adv)):
        if coef == 0.0:
            continue
        grads = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        # Several processes: average before |.|, so RGP is that of the global batch's gradient and
        # every rank masks the same weights (a no-op in one process).
        all_reduce_mean_([g for g in grads if g is not None])
        with torch.no_grad():
            for s, g in zip(scores, grads, strict=True):
                if g is not None:  # an unused weight has no gradient: prominence 0 from this term
                    s.add_(g if signed else g.abs(), alpha=coef)
    return scores


def lowest_mask(score: Tensor, k: int) -> Tensor:
    """Bool mask (shape of `score`) of the k entries with the lowest score; ties by flat index."""
    flat = score.detach().flatten()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        mask[torch.argsort(flat, stable=True)[:k]] = True
    return mask.view(score.shape)


def percentile_mask(score: Tensor, p: float) -> Tensor:
    """Bool mask (shape of `score`) of the entries strictly below the p-th percentile of `score`,
    the percentile linearly interpolated between order statistics (numpy's default): the official
    `grad_rgp < np.percentile(grad_rgp, p)`. Ties at the threshold are kept, so up to p% is zeroed."""
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile_mask needs 0 <= p <= 100, got p={p}")
    flat = score.detach().flatten().double()
    ordered = flat.sort().values
    pos = p / 100.0 * (flat.numel() - 1)          # fractional rank of the percentile
    lo = math.floor(pos)
    hi = min(lo + 1, flat.numel() - 1)
    threshold = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
    return (flat < threshold).view(score.shape)


@torch.no_grad()
def mask_gradients(params: Mapping[str, nn.Parameter], scores: Mapping[str, Tensor], p: float,
                   variant: RGPVariant = "paper") -> tuple[int, int]:
    """Zero, in `.grad` only, the p% lowest-score entries of each named parameter: exactly
    k = masked_count(n, p) of them (paper), or those strictly below the p-th percentile (official).

    Returns (entries zeroed, entries considered). A parameter without a gradient is skipped.
    """
    zeroed = total = 0
    for name, score in scores.items():
        param = params[name]
        if param.grad is None:
            continue
        if score.shape != param.grad.shape:
            raise ValueError(f"RGP score for {name} has shape {tuple(score.shape)}, its gradient "
                             f"{tuple(param.grad.shape)}")
        total += score.numel()
        if variant == "official":
            mask = percentile_mask(score, p)
        else:
            mask = lowest_mask(score, masked_count(score.numel(), p))
        # masked_fill_ indexes logically, so it is right for any gradient memory layout (channels_last)
        param.grad.masked_fill_(mask.to(param.grad.device), 0.0)
        zeroed += int(mask.sum())
    return zeroed, total
