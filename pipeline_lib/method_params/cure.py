"""CURE's params (pipeline_lib/methods/cure.py; the RGP mask in methods/rgp.py, the revision model in
methods/revision.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from . import register_params
from .trades import TradesStartParams

RGPLayers = Literal["conv_linear", "conv", "conv1"]   # the weight tensors RGP masks (methods/rgp.py: select_weights)
RGPVariant = Literal["paper", "official"]


@register_params("cure")
class CureParams(TradesStartParams):
    """CURE's params. Paper notation: beta, p, alpha, gamma, r, d. Inherits TRADES' `init_std`
    (the attack starts at x + init_std * N(0, 1), 0.001 in TRADES and CURE) and `clamp_start`
    (false = official: the start enters the first attack forward unprojected)."""

    # L_adv = CE(f(x), y) + beta * KL(p(x) || p(x_adv)). The paper states beta = 1; the official
    # code's default is trades_beta = 5.
    beta: float = Field(default=1.0, ge=0)
    # -- Conserve / Update: RGP gradient mask (methods/rgp.py) -------------------------------
    rgp: bool = True                               # false = ablation "RGP off": no gradient masked
    # paper: alpha |g_nat| + (1 - alpha) |g_adv|, exactly the k lowest zeroed (rgp.py);
    # official: rgp_soft, alpha g_nat + (1 - alpha) g_adv signed, below the p-th percentile zeroed
    rgp_variant: RGPVariant = "paper"
    p: float = Field(default=30.0, ge=0, lt=100)   # % of each layer's weights whose gradient is zeroed
    alpha: float = Field(default=0.1, ge=0, le=1)  # RGP = alpha |dCE(x)/dw| + (1 - alpha) |dL(x_adv)/dw|
    # masked tensors: conv_linear (every conv and linear weight) | conv | conv1 (the official
    # `'conv1' in name`, stem excluded); null = the variant's own (methods/cure.py: VARIANT_LAYERS)
    rgp_layers: RGPLayers | None = None
    rgp_exclude: tuple[str, ...] = ()              # globs on parameter names to spare, e.g. ["head.*"]
    # L(x_adv) in RGP: 'kl' = the robust term KL(p(x) || p(x_adv)) of L_adv (official rgp_soft);
    # 'ce' = CE(f(x_adv), y) (official 'rgp' mode).
    rgp_adv_loss: Literal["kl", "ce"] = "kl"
    # -- Revise: revision model and consistency loss (methods/revision.py) -------------------
    revision: bool = True                          # false = ablation "revision off": no theta_rev, no L_CR
    gamma: float = Field(default=1.0, ge=0)        # weight of L_CR
    r: float = Field(default=0.2, ge=0, le=1)      # probability of an EMA update per step
    d: float = Field(default=0.999, ge=0, le=1)    # EMA decay cap: d_t = min(1 - 1/(t + 1), d)
