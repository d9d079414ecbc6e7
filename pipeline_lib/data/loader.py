"""An in-memory, device-resident batch loader with batched augmentation.

These datasets fit in memory (CIFAR-10 train is 150 MB as uint8), so images
stay uint8 on the training device and every batch is sliced, converted and
augmented there in one shot: no per-sample Python transforms, no worker
processes, and shuffling/augmentation driven by one seeded generator per epoch,
so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(x: Tensor, pad: int, gen: torch.Generator) -> Tensor:
    """Per-example random crop after zero padding; x: (B, C, H, W) float -> same shape."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    di = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    dj = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    rows = (di[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dj[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    cidx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bidx, cidx, rows, cols]


def random_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    flip = (torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(x: Tensor, kind: str, gen: torch.Generator, pad: int = 4) -> Tensor:
    if kind == "none":
        return x
    if kind == "flip":
        return random_flip(x, gen)
    if kind == "crop_flip":
        return random_flip(random_crop(x, pad, gen), gen)
    raise ValueError(f"unknown augmentation {kind!r}")


class BatchLoader:
    """Iterate (x, y) batches: x float32 in [0, 1] (B, C, H, W), y int64 (B,), on `device`.

    Call `set_epoch(e)` before iterating to fix that epoch's order and augmentation.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, *, shuffle: bool = False,
                 augment: str = "none", drop_last: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_examples(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # CPU generator even for CUDA data: identical streams on every device.
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.images)
        order = torch.randperm(n, generator=gen).to(self.device) if self.shuffle else None
        for i in range(len(self)):
            idx = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            sel = order[idx] if order is not None else idx
            x = self.images[sel].float().div_(255.0)
            x = augment(x, self.augment, gen)
            yield x, self.labels[sel]
