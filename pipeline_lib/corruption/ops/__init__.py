"""The 19 CIFAR-C corruptions, batched; importing this package registers them all in CORRUPTIONS."""

from . import blur, digital, noise, weather  # noqa: F401  (registration side effect)
from .base import CORRUPTIONS, Corruption, to_uint8

__all__ = ["CORRUPTIONS", "Corruption", "to_uint8"]
