"""The corruption contract and registry.

Every corruption works on a batch: `apply(x, c, rngs)` with

    x     float32 (N, H, W, C) in [0, 1], C = 1 (grey) or 3 (RGB), H and W any size
    c     the severity's entry of the CIFAR-C parameter table (`Corruption.table[severity - 1]`)
    rngs  one numpy Generator per image (None for deterministic corruptions)

and returns an array of the same shape with values in [0, 1] (the generator clips
and quantises to uint8). All randomness of image i comes from rngs[i], drawn in a
fixed order, so an image's output does not depend on the batch it is in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...registry import Registry

Rngs = Sequence[np.random.Generator] | None
ApplyFn = Callable[[np.ndarray, Any, Rngs], np.ndarray]

# ITU-R BT.601 luma weights: OpenCV's RGB2GRAY, used by CIFAR-C's snow; also how the
# colour constants of frost and spatter are mapped to grey images.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Corruption:
    name: str
    apply: ApplyFn
    table: tuple[Any, ...]       # the parameter of severities 1..5 (make_cifar_c.py's `c` lists)
    stochastic: bool             # draws random numbers (needs per-image generators)
    monotone: bool               # the table makes the distortion grow with severity
    needs_colour: bool = False   # meaningless on grey images (skipped there, with `skip_reason`)
    skip_reason: str = ""
    differs: str = ""            # how it differs from the released CIFAR-C, if at all


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def corruption(name: str, table: Sequence[Any], *, stochastic: bool, monotone: bool,
               needs_colour: bool = False, skip_reason: str = "", differs: str = "") -> Callable[[ApplyFn], ApplyFn]:
    """Register `fn` as corruption `name` with its 5-entry severity table."""
    if len(table) != 5:
        raise ValueError(f"{name}: the severity table needs 5 entries, got {len(table)}")

    def deco(fn: ApplyFn) -> ApplyFn:
        CORRUPTIONS.register(name)(Corruption(name, fn, tuple(table), stochastic, monotone,
                                              needs_colour, skip_reason, differs))
        return fn

    return deco


def colour(rgb: Sequence[float], channels: int) -> np.ndarray:
    """An RGB colour in [0, 1] as a (C,) vector for images with `channels` channels (grey: its luma)."""
    v = np.asarray(rgb, dtype=np.float32)
    return v if channels == 3 else np.array([float(v @ LUMA)], dtype=np.float32)


def grey(x: np.ndarray) -> np.ndarray:
    """Luma of (N, H, W, C) images as (N, H, W, 1)."""
    return x if x.shape[-1] == 1 else (x @ LUMA)[..., None]


def per_image(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """Apply an OpenCV/PIL-style function of one (H, W, C) image to each image of (N, H, W, C).

    OpenCV drops a singleton channel axis ((H, W, 1) -> (H, W)); it is restored here.
    """
    out = np.empty_like(x)
    for i in range(len(x)):
        out[i] = fn(x[i]).reshape(x.shape[1:])
    return out


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounding to the nearest level."""
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def draw(rngs: Rngs, fn: Callable[[np.random.Generator], Any]) -> np.ndarray:
    """Stack one draw per image: draw(rngs, lambda r: r.normal(size=(H, W))) -> (N, H, W)."""
    if rngs is None:
        raise ValueError("this corruption is stochastic and needs one generator per image")
    return np.stack([np.asarray(fn(r)) for r in rngs])
