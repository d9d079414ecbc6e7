"""Base class for every params object: strict (unknown keys rejected) and immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    # allow_inf_nan=False: `weight_decay: .inf` or `lr: .nan` fails here, naming the key, not as a NaN loss later
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NoParams(StrictModel):
    """For objectives that take no parameters of their own."""
