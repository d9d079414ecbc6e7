"""Static facts about each supported dataset."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]  # per-channel, used by the model's Normalize layer
    std: tuple[float, ...]
    default_augment: str     # "none" | "flip" | "crop_flip"
    train_size: int
    test_size: int


SPECS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), "none", 60_000, 10_000),
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616),
                           "crop_flip", 50_000, 10_000),
    "cifar100": DatasetSpec("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            "crop_flip", 50_000, 10_000),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(SPECS))}") from None


def known_dataset(name: str) -> str:
    """`name` if it is a supported dataset (a params validator), else ValueError naming it."""
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(SPECS))}")
    return name
