"""Attacks in pixel space on [0, 1] images.

`training` (the training attack's settings, built from `threat`) imports no torch, and importing it
runs this file first: so the attacks themselves (torch) load on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .pgd import LossFn, ce_loss, cw_margin_loss, pgd_linf, uniform_start

_LAZY = {"LossFn": "pgd", "ce_loss": "pgd", "cw_margin_loss": "pgd", "pgd_linf": "pgd", "uniform_start": "pgd"}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = ["LossFn", "ce_loss", "cw_margin_loss", "pgd_linf", "uniform_start"]
