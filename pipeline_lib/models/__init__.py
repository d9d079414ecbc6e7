"""Model registry. `build_model(arch, spec)` builds any registered architecture for a dataset."""

from __future__ import annotations

from collections.abc import Callable

from ..data.spec import DatasetSpec
from ..registry import Registry
from .base import ImageClassifier, Normalize
from .resnet import ResNet
from .small_cnn import SmallCNN
from .wide_resnet import WideResNet

ModelBuilder = Callable[[DatasetSpec], ImageClassifier]
MODELS: Registry[ModelBuilder] = Registry("model")


@MODELS.register("small_cnn")
def small_cnn(spec: DatasetSpec) -> ImageClassifier:
    return SmallCNN(spec.num_classes, spec.channels, spec.mean, spec.std)


@MODELS.register("resnet18")
def resnet18(spec: DatasetSpec) -> ImageClassifier:
    return ResNet((2, 2, 2, 2), spec.num_classes, spec.channels, spec.mean, spec.std)


@MODELS.register("wrn34_10")
def wrn34_10(spec: DatasetSpec) -> ImageClassifier:
    return WideResNet(34, 10, spec.num_classes, spec.channels, spec.mean, spec.std)


def build_model(arch: str, spec: DatasetSpec) -> ImageClassifier:
    return MODELS.get(arch)(spec)


def known_arch(name: str) -> str:
    """`name` if it is a registered architecture (a params validator), else ValueError naming it."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(MODELS.names())}")
    return name


__all__ = ["MODELS", "ImageClassifier", "Normalize", "build_model", "known_arch"]
