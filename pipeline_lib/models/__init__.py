"""Model registry. `build_model(arch, spec)` builds any registered architecture for a dataset.

Importing this package imports no torch: each builder imports its model's module when it runs, so the
architecture names are known to `known_arch` (params validation, pipeline_lib.registered) in the stages
that build no model (aggregate, profile). The torch-side names load on first use (PEP 562).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..data.spec import DatasetSpec
from ..lazy import lazy_exports
from ..registry import Registry

if TYPE_CHECKING:
    from .base import ImageClassifier, Normalize

ModelBuilder = Callable[[DatasetSpec], "ImageClassifier"]
MODELS: Registry[ModelBuilder] = Registry("model")


@MODELS.register("small_cnn")
def small_cnn(spec: DatasetSpec) -> ImageClassifier:
    from .small_cnn import SmallCNN

    return SmallCNN(spec.num_classes, spec.channels, spec.mean, spec.std)


@MODELS.register("resnet18")
def resnet18(spec: DatasetSpec) -> ImageClassifier:
    from .resnet import ResNet

    return ResNet((2, 2, 2, 2), spec.num_classes, spec.channels, spec.mean, spec.std)


@MODELS.register("wrn34_10")
def wrn34_10(spec: DatasetSpec) -> ImageClassifier:
    from .wide_resnet import WideResNet

    return WideResNet(34, 10, spec.num_classes, spec.channels, spec.mean, spec.std)


def build_model(arch: str, spec: DatasetSpec) -> ImageClassifier:
    return MODELS.get(arch)(spec)


def known_arch(name: str) -> str:
    """`name` if it is a registered architecture (a params validator), else ValueError naming it."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(MODELS.names())}")
    return name


__getattr__ = lazy_exports(__name__, {"ImageClassifier": "base", "Normalize": "base"})

__all__ = ["MODELS", "ImageClassifier", "Normalize", "build_model", "known_arch"]
