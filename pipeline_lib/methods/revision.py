"""CURE's revision model: a stochastic EMA of the trained weights (Gowda et al., ICLR 2024).

After an optimizer step, with probability r,

    theta_rev <- d * theta_rev + (1 - d) * theta,   d = min(1 - 1 / (step + 1), d_max)

where `step` counts optimizer steps from 1 (the shared loop passes it that way,
as the official code's `global_step`), so the first updates follow theta
closely and d approaches d_max (0.999) as training goes on.

Parameters only. Buffers (BatchNorm running statistics) are not averaged: the
revision model's forward runs in train mode (BN batch statistics, as the
official code's `model_ema.train()`), so its running buffers never influence
its outputs; they stay a copy of the initial model's, updated only by its own
forwards, and are saved with it so a resumed run restores exactly the same object.

The coin for "update or not" comes from a private CPU generator seeded from
the run seed, whose state is part of `state_dict()`: a run resumed at an epoch
boundary draws the same coins an uninterrupted run would.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..runtime import preserve_mode

# Salt so the revision coin stream differs from the attack-noise stream seeded with the same run seed.
_RNG_SALT = 0x5EED_C0DE


def revision_decay(step: int, d_max: float) -> float:
    """d = min(1 - 1/(step + 1), d_max) for optimizer step `step` >= 1."""
    if step < 1:
        raise ValueError(f"revision step counts optimizer steps from 1, got step={step}")
    return min(1.0 - 1.0 / (step + 1), d_max)


class RevisionModel:
    """A frozen copy of a model that follows it by a stochastic EMA of its parameters."""

    def __init__(self, model: nn.Module, *, r: float, d_max: float, seed: int) -> None:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"revision probability r must be in [0, 1], got {r}")
        if not 0.0 <= d_max <= 1.0:
            raise ValueError(f"revision decay cap d must be in [0, 1], got {d_max}")
        self.r = r
        self.d_max = d_max
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.generator = torch.Generator().manual_seed(seed + _RNG_SALT)

    # -- forward ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits (B, K) of the revision model in train mode (BN batch statistics), no graph."""
        with preserve_mode(self.module):
            self.module.train()
            return self.module(x)

    # -- update ----------------------------------------------------------------------------
    def draw(self) -> bool:
        """One Bernoulli(r) coin from the private generator (drawn every step, update or not)."""
        return bool(torch.rand((), generator=self.generator).item() < self.r)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Apply the EMA unconditionally; returns the d used."""
        d = revision_decay(step, self.d_max)
        rev = list(self.module.parameters())
        cur = list(model.parameters())
        if len(rev) != len(cur):
            raise ValueError(f"revision model has {len(rev)} parameters, the trained model {len(cur)}")
        for p_rev, p in zip(rev, cur, strict=True):
            # d * theta_rev + (1 - d) * theta, in place on the revision weights
            p_rev.mul_(d).add_(p.detach().to(p_rev.device), alpha=1.0 - d)
        return d

    def maybe_update(self, model: nn.Module, step: int) -> bool:
        """Draw the coin; on success apply the EMA. Returns whether it updated."""
        if self.draw():
            self.update(model, step)
            return True
        return False

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"module", "rng"} - set(state)
        if missing:
            raise KeyError(f"revision state lacks {sorted(missing)}; has {sorted(state)}")
        self.module.load_state_dict(state["module"])
        self.generator.set_state(state["rng"].cpu())
