"""The CIFAR-C on-disk layout, for released and generated sets alike.

A folder holds one `<corruption>.npy` per corruption, uint8 (5 * n, H, W, C) (or
(5 * n, H, W) for grey), severity s in rows [(s - 1) * n, s * n), and `labels.npy`
(5 * n,) with the labels repeated for each severity: the layout of CIFAR-10-C /
CIFAR-100-C (n = 10000), which this module reads without loading whole files
(memory-mapped). The `corrupt` stage also writes `manifest.json` into its output
folder: where the arrays are (the folder itself, or a released folder) and what they hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write, read_json, write_json
from .config import ALL, SEVERITIES
from ..errors import UserError

LABELS = "labels.npy"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "arpipe-corrupted/1"


class CorruptedSetError(UserError, ValueError):
    """A corrupted-set folder or file is missing, truncated or inconsistent; the message names the file."""


def save_array(path: str | Path, array: np.ndarray) -> None:
    """np.save through an atomic replace."""
    atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))


def write_set(folder: str | Path, arrays: dict[str, np.ndarray], labels: np.ndarray) -> None:
    """Write `<name>.npy` for each array (5 * n rows) and `labels.npy` (the n labels, repeated 5 times)."""
    folder = Path(folder)
    n = len(labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError("labels must fit in uint8 (the CIFAR-C labels.npy dtype)")
    for name, array in arrays.items():
        if array.dtype != np.uint8 or len(array) != len(SEVERITIES) * n:
            raise ValueError(f"{name}: expected uint8 with {len(SEVERITIES) * n} rows, got {array.dtype} "
                             f"{array.shape}")
    for name, array in arrays.items():
        save_array(folder / f"{name}.npy", array)
    save_array(folder / LABELS, np.tile(labels.astype(np.uint8), len(SEVERITIES)))


def _open_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CorruptedSetError(f"{path} does not exist")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CorruptedSetError(f"{path} is truncated or not a valid .npy file ({exc}); delete it and "
                                "extract or generate it again") from None


class CorruptedSet:
    """Read slices of a folder in the CIFAR-C layout.

    >>> cs = CorruptedSet("data/CIFAR-10-C")
    >>> x, y = cs.load("fog", 3, n=1000)   # uint8 (1000, 32, 32, 3), int64 (1000,)
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CorruptedSetError(f"corrupted-set folder {self.folder} does not exist")
        labels = _open_npy(self.folder / LABELS)
        if labels.ndim != 1 or len(labels) == 0 or len(labels) % len(SEVERITIES):
            raise CorruptedSetError(f"{self.folder / LABELS}: expected (5 * n,) labels, got shape {labels.shape}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.n = len(labels) // len(SEVERITIES)   # images per severity

    @property
    def names(self) -> list[str]:
        """Corruptions present, in the canonical CIFAR-C order."""
        return [m for m in ALL if (self.folder / f"{m}.npy").is_file()]

    def load(self, name: str, severity: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first n images of `name` at `severity`: uint8 (n, H, W, C) and int64 labels (n,)."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
        n = self.n if n is None else n
        if not 1 <= n <= self.n:
            raise ValueError(f"n={n} outside 1..{self.n}, the images per severity in {self.folder}")
        if name not in ALL:
            raise KeyError(f"unknown corruption {name!r}; known: {', '.join(ALL)}")
        path = self.folder / f"{name}.npy"
        if not path.is_file():
            raise CorruptedSetError(f"{path} does not exist; {self.folder} holds: {', '.join(self.names) or 'none'}")
        images = _open_npy(path)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(self.labels):
            raise CorruptedSetError(f"{path}: expected uint8 ({len(self.labels)}, H, W[, C]) to match "
                                    f"{LABELS}, got {images.dtype} {images.shape}")
        start = (severity - 1) * self.n
        x = np.array(images[start:start + n])   # copies only the slice out of the memory map
        if x.ndim == 3:
            x = x[..., None]
        return x, self.labels[start:start + n].copy()


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> None:
    write_json(Path(out_dir) / MANIFEST, {"format": MANIFEST_FORMAT, **manifest})


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise CorruptedSetError(f"{path} does not exist: run the `corrupt` stage first (dvc repro corrupt)")
    try:
        manifest = read_json(path)
    except ValueError as exc:   # a cut or hand-broken file
        raise CorruptedSetError(f"{path} is not valid JSON ({exc}): run the `corrupt` stage again") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if fmt != MANIFEST_FORMAT:
        raise CorruptedSetError(f"{path} is not an arpipe corrupted-set manifest (format={fmt!r})")
    return manifest


def open_set(out_dir: str | Path) -> tuple[CorruptedSet, dict[str, Any]]:
    """The set a `corrupt` stage output folder describes: (reader, manifest)."""
    manifest = read_manifest(out_dir)
    return CorruptedSet(Path(out_dir) / manifest["data_dir"]), manifest
