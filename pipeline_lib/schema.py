"""Base class for every params object: strict (unknown keys rejected) and immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(StrictModel):
    """For objectives that take no parameters of their own."""
