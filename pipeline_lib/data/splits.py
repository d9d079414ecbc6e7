"""The train subset and test prefix the stages use, loaded from the published files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .sources import load_split


def train_subset(images: Tensor, labels: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random subset of n training examples (all of them when n is None)."""
    if n is None or n >= len(images):
        return images, labels
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    idx, _ = idx.sort()
    return images[idx], labels[idx]


def test_subset(images: Tensor, labels: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
    """The first n test examples, the RobustBench convention for n_eval."""
    if n is None:
        return images, labels
    return images[:n], labels[:n]


def load_train(name: str, root: str | Path, n: int | None, seed: int, download: bool = False) -> tuple[Tensor, Tensor]:
    images, labels = load_split(name, root, train=True, download=download)
    return train_subset(images, labels, n, seed)


def load_test(name: str, root: str | Path, n: int | None, download: bool = False) -> tuple[Tensor, Tensor]:
    images, labels = load_split(name, root, train=False, download=download)
    return test_subset(images, labels, n)
