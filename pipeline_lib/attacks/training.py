"""The training attack: the one place its settings are built from the `threat` section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import AttackOverride, ThreatParams
from ..schema import StrictModel


class AttackParams(StrictModel):
    """L-inf PGD used to make training examples. eps/step in pixel units of [0, 1] images."""

    eps: float = Field(gt=0, le=1)
    step_size: float = Field(gt=0, le=1)
    steps: int = Field(ge=1, le=1000)
    random_start: bool = True
    # Mode the model is in while the attack runs: 'eval' (TRADES/MART/CURE code) or
    # 'train' (BN batch statistics, as AR-AT's official code does through the adv BN).
    bn_mode: Literal["eval", "train"] = "eval"


def training_attack(threat: ThreatParams, override: AttackOverride | None = None) -> AttackParams:
    """threat's eps, train_step_size and train_steps, with a method's `attack` overrides key by key."""
    changes = override.model_dump(exclude_none=True) if override is not None else {}
    return AttackParams.model_validate({"eps": threat.eps, "step_size": threat.train_step_size,
                                        "steps": threat.train_steps, **changes})
