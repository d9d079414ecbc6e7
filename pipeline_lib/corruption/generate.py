"""Generating corrupted images: seeded per (corruption, severity, image), independent of batching.

Image i of corruption c at severity s draws its random numbers from
`np.random.default_rng([seed, crc32(c), s, i])`, where i is the image's index in the
test set. Generating the set in chunks of any size, or one image at a time, gives
bit-identical output.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .config import SEVERITIES
from .ops import CORRUPTIONS, Corruption, to_uint8

log = logging.getLogger(__name__)

CHUNK = 250  # images per call: bounds peak memory (elastic's coordinate grid) whatever n is


def check_images(images: np.ndarray) -> None:
    """Corruptions take uint8 (N, H, W, C) images with C = 1 or 3."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, H, W, C) with C in (1, 3), got {images.dtype} "
                         f"{tuple(images.shape)}")


def applicable(name: str, channels: int) -> str | None:
    """None if corruption `name` applies to images with `channels` channels, else the reason it is skipped."""
    op = CORRUPTIONS.get(name)
    if op.needs_colour and channels != 3:
        return op.skip_reason
    return None


def image_rngs(seed: int, name: str, severity: int, indices: Iterable[int]) -> list[np.random.Generator]:
    key = zlib.crc32(name.encode())  # stable across runs and Python versions, unlike hash()
    return [np.random.default_rng([seed, key, severity, int(i)]) for i in indices]


def corrupt(images: np.ndarray, name: str, severity: int, *, seed: int = 0,
            indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Corrupt uint8 (N, H, W, C) images with `name` at `severity` (1..5) -> uint8, same shape.

    `indices` are the images' positions in the full test set (default 0..N-1): they,
    not the position in this batch, seed each image's randomness.
    """
    check_images(images)
    op: Corruption = CORRUPTIONS.get(name)
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    reason = applicable(name, images.shape[-1])
    if reason:
        raise ValueError(f"{name} does not apply to {images.shape[-1]}-channel images: {reason}")
    idx = np.arange(len(images)) if indices is None else np.asarray(indices)
    if len(idx) != len(images):
        raise ValueError(f"{len(idx)} indices for {len(images)} images")
    rngs = image_rngs(seed, name, severity, idx) if op.stochastic else None
    x = images.astype(np.float32) / np.float32(255.0)
    out = np.asarray(op.apply(x, op.table[severity - 1], rngs))
    if out.shape != x.shape:
        raise RuntimeError(f"{name} returned shape {out.shape} for input {x.shape}")
    return to_uint8(out)


@dataclass(frozen=True)
class GeneratedSet:
    arrays: dict[str, np.ndarray]   # name -> uint8 (5 * N, H, W, C), severity s in rows [(s-1)N, sN)
    skipped: dict[str, str]         # name -> why it does not apply to these images


def generate(images: np.ndarray, names: Sequence[str], *, seed: int, chunk: int = CHUNK,
             progress: bool = True) -> GeneratedSet:
    """Every applicable corruption of `names` at the 5 severities, in the CIFAR-C row layout."""
    check_images(images)
    n = len(images)
    todo = [m for m in names if applicable(m, images.shape[-1]) is None]
    skipped = {m: reason for m in names if (reason := applicable(m, images.shape[-1]))}
    for m, reason in skipped.items():
        log.warning("skipping %s: %s", m, reason)
    starts = range(0, n, chunk)
    arrays: dict[str, np.ndarray] = {}
    with tqdm(total=len(todo) * len(SEVERITIES) * len(starts), desc="corrupt", unit="chunk",
              disable=not progress) as bar:
        for m in todo:
            out = np.empty((len(SEVERITIES) * n, *images.shape[1:]), dtype=np.uint8)
            for s in SEVERITIES:
                bar.set_postfix_str(f"{m} s{s}")
                for start in starts:
                    stop = min(n, start + chunk)
                    out[(s - 1) * n + start:(s - 1) * n + stop] = corrupt(
                        images[start:stop], m, s, seed=seed, indices=np.arange(start, stop))
                    bar.update()
            arrays[m] = out
    return GeneratedSet(arrays, skipped)
