"""Attacks in pixel space on [0, 1] images."""

from .pgd import LossFn, ce_loss, cw_margin_loss, pgd_linf, uniform_start

__all__ = ["LossFn", "ce_loss", "cw_margin_loss", "pgd_linf", "uniform_start"]
