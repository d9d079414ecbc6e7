"""TRADES' params (pipeline_lib/methods/trades.py), and the attack start TRADES, MART and CURE share."""

from __future__ import annotations

from pydantic import Field

from ..schema import StrictModel
from . import register_params


class TradesStartParams(StrictModel):
    """The TRADES-style attack start, shared by TRADES, MART and CURE."""

    init_std: float = Field(default=0.001, ge=0)  # attack start x + init_std * N(0, 1)
    clamp_start: bool = True    # project the start onto the ball and [0, 1]; false = official (unprojected)


@register_params("trades")
class TradesParams(TradesStartParams):
    beta: float = Field(default=6.0, ge=0)        # weight of the KL (robustness) term; 0 = clean CE only
    three_forwards: bool = False  # official: clean, adv, clean train-mode forwards (BN statistics move 3x)
