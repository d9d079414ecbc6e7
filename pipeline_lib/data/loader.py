"""The training batch loader: seeded order and batched augmentation, device-resident or pinned.

Two storage modes (`runtime.loader`), giving identical batches:

* ``device`` (default): these datasets fit in memory (CIFAR-10 train is 150 MB as uint8), so
  the images stay uint8 on the training device and every batch is sliced, converted and
  augmented there in one shot: no per-sample Python transforms, no worker processes, no
  host-to-device copy per step. The fastest path whenever the dataset fits beside the model.
* ``pinned``: the images stay in host memory. A torch DataLoader gathers each batch's uint8
  rows (in `num_workers` background processes), pins them, and the batch is copied to the
  device asynchronously (non_blocking) before being converted and augmented there. For
  datasets that do not fit on the device, or a small GPU shared by several processes.

Shuffling and augmentation are driven by one seeded CPU generator per epoch, consumed in
the same order in both modes, so a resumed run sees exactly the batches an uninterrupted
one would and the two modes agree bit for bit.

Data parallel (DDP): with `world_size` > 1 the loader still walks the *global* batches of
`batch_size` examples in the global order, and yields rank `rank`'s contiguous block of
`batch_size / world_size` rows of each. Augmentation draws are made for the whole global
batch and each rank applies its rows' draws, so the ranks' shards together are exactly the
single-process batch, example by example.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

Storage = Literal["device", "pinned"]


def random_crop(x: Tensor, pad: int, gen: torch.Generator, draws: int | None = None, offset: int = 0) -> Tensor:
    """Per-example random crop after zero padding; x: (B, C, H, W) float -> same shape.

    Offsets are drawn for `draws` examples (default B) and rows [offset, offset + B) of them
    are applied: a DDP rank holding part of a larger batch consumes the generator exactly as
    the whole batch would.
    """
    b, c, h, w = x.shape
    n = b if draws is None else draws
    padded = F.pad(x, (pad, pad, pad, pad))
    di = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device)[offset:offset + b].to(x.device)
    dj = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device)[offset:offset + b].to(x.device)
    rows = (di[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dj[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    cidx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bidx, cidx, rows, cols]


def random_flip(x: Tensor, gen: torch.Generator, draws: int | None = None, offset: int = 0) -> Tensor:
    """Horizontal flip of each example with probability 1/2 (draws / offset as in random_crop)."""
    n = len(x) if draws is None else draws
    flip = (torch.rand(n, generator=gen, device=gen.device)[offset:offset + len(x)] < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(x: Tensor, kind: str, gen: torch.Generator, pad: int = 4, draws: int | None = None,
            offset: int = 0) -> Tensor:
    """Augment x (B, C, H, W); `draws` / `offset`: x is rows [offset, offset + B) of a batch of `draws`."""
    if kind == "none":
        return x
    if kind == "flip":
        return random_flip(x, gen, draws, offset)
    if kind == "crop_flip":
        return random_flip(random_crop(x, pad, gen, draws, offset), gen, draws, offset)
    raise ValueError(f"unknown augmentation {kind!r}")


class _RowGather(Dataset[tuple[Tensor, Tensor]]):
    """dataset[idx] for an index tensor idx (one batch's rows): (uint8 images (b, C, H, W), labels (b,))."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.images[idx], self.labels[idx]


class BatchLoader:
    """Iterate (x, y) batches: x float32 in [0, 1] (B, C, H, W), y int64 (B,), on `device`.

    Call `set_epoch(e)` before iterating to fix that epoch's order and augmentation.
    `batch_size` is the global batch; with world_size > 1 each batch yields this rank's
    batch_size / world_size rows (see the module docstring).
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, *, shuffle: bool = False,
                 augment: str = "none", drop_last: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu", storage: Storage = "device", num_workers: int = 0,
                 rank: int = 0, world_size: int = 1,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if storage not in ("device", "pinned"):
            raise ValueError(f"unknown loader storage {storage!r}; use 'device' or 'pinned'")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        if world_size > 1 and batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {world_size} processes: "
                             "each process takes an equal share of the global batch")
        self.device = torch.device(device)
        self.storage: Storage = storage
        # pinned: host memory (the DataLoader pins each gathered batch); device: resident on the device
        home = torch.device("cpu") if storage == "pinned" else self.device
        self.images = images.to(home)
        self.labels = labels.to(home)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.memory_format = memory_format
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_examples(self) -> int:
        return len(self.images)

    def unsharded(self) -> BatchLoader:
        """The same loader (data shared, same epoch) yielding whole global batches, for work every
        rank must do identically on the same examples (e.g. AR-AT's per-epoch clean accuracy)."""
        if self.world_size == 1:
            return self
        view = copy.copy(self)
        view.rank, view.world_size = 0, 1
        return view

    def _rows(self, b: int) -> tuple[int, int]:
        """[start, stop) of this rank's rows within a batch of b examples."""
        return self.rank * b // self.world_size, (self.rank + 1) * b // self.world_size

    def _plan(self, gen: torch.Generator) -> list[tuple[Tensor | slice, int, int]]:
        """Per batch: (this rank's example indices, global batch size, offset of the rank's rows)."""
        n = len(self.images)
        order = torch.randperm(n, generator=gen) if self.shuffle else None   # CPU, drawn first
        plan: list[tuple[Tensor | slice, int, int]] = []
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min(n, (i + 1) * self.batch_size)
            start, stop = self._rows(hi - lo)
            rows = slice(lo + start, lo + stop)
            plan.append((order[rows] if order is not None else rows, hi - lo, start))
        return plan

    def _finish(self, x_u8: Tensor, gen: torch.Generator, draws: int, offset: int) -> Tensor:
        """uint8 rows on the device -> float [0, 1], augmented, in the requested memory format."""
        x = augment(x_u8.float().div_(255.0), self.augment, gen, draws=draws, offset=offset)
        return x.contiguous(memory_format=self.memory_format)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # CPU generator even for CUDA data: identical streams on every device and in both modes.
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        plan = self._plan(gen)
        if self.storage == "device":
            for sel, draws, offset in plan:
                sel = sel.to(self.device) if isinstance(sel, Tensor) else sel
                yield self._finish(self.images[sel], gen, draws, offset), self.labels[sel]
            return
        for (x_u8, y), (_, draws, offset) in zip(self._gathered(plan), plan, strict=True):
            x_u8 = x_u8.to(self.device, non_blocking=True)
            yield self._finish(x_u8, gen, draws, offset), y.to(self.device, non_blocking=True)

    def _gathered(self, plan: Sequence[tuple[Tensor | slice, int, int]]) -> Iterator[tuple[Tensor, Tensor]]:
        """Host batches (uint8 images, labels) of the plan, gathered by a DataLoader, pinned on CUDA."""
        index = [sel if isinstance(sel, Tensor) else torch.arange(sel.start, sel.stop) for sel, _, _ in plan]
        loader = DataLoader(_RowGather(self.images, self.labels), batch_size=None, sampler=index,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        yield from loader
