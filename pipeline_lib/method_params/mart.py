"""MART's params (pipeline_lib/methods/mart.py)."""

from __future__ import annotations

from pydantic import Field

from . import register_params
from .trades import TradesStartParams


@register_params("mart")
class MartParams(TradesStartParams):
    """beta, and the attack start (init_std; clamp_start: false = official, unprojected start)."""

    beta: float = Field(default=6.0, ge=0)        # weight of the misclassification-aware KL term
