"""The `external:` params section: published checkpoints to import, one entry per model name.

    external:
      trades_wrn: {path: downloads/model_cifar_wrn.pt, format: state_dict, arch: wrn34_10, dataset: cifar10}
      their_net:  {path: downloads/net.ts, format: torchscript, dataset: cifar10, normalization: dataset}

Each entry becomes the DVC stage `import@<name>` writing models/<name>.pt, which the
evaluate / corruption / aggregate stages then treat like a trained model of that name.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..data.spec import SPECS, known_dataset
from ..schema import StrictModel

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"   # a model name is a file name (models/<name>.pt)


class MeanStd(StrictModel):
    """Per-channel normalisation the published network expects on its input."""

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_length(self) -> MeanStd:
        if len(self.mean) != len(self.std):
            raise ValueError(f"normalization mean has {len(self.mean)} values, std {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"normalization std must be positive, got {self.std}")
        return self


# auto: mean/std buffers stored in the file if any, else none (a TorchScript file: none); none: the network takes [0, 1]
# pixels as they are; dataset: the project's mean/std of `dataset`; or explicit {mean, std}.
Normalization = Literal["auto", "none", "dataset"] | MeanStd


class ExternalModel(StrictModel):
    path: str                                   # the local file to import (relative to the project root)
    format: Literal["state_dict", "torchscript"]
    dataset: str                                # the dataset it was trained on (channels, classes)
    arch: str | None = None                     # state_dict: a registry architecture (resnet18, wrn34_10, ...)
    normalization: Normalization = "auto"
    source: str = ""                            # where it comes from (paper, URL): kept in the provenance

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        return known_dataset(v)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str | None) -> str | None:
        from ..models import known_arch

        return None if v is None else known_arch(v)

    @model_validator(mode="after")
    def _format_fields(self) -> ExternalModel:
        if self.format == "state_dict" and self.arch is None:
            raise ValueError("format: state_dict needs `arch` (a registered architecture); "
                             "any other network: export it to TorchScript and use format: torchscript")
        if self.format == "torchscript" and self.arch is not None:
            raise ValueError(f"format: torchscript carries its own architecture; remove arch={self.arch!r}")
        if isinstance(self.normalization, MeanStd) and len(self.normalization.mean) != SPECS[self.dataset].channels:
            raise ValueError(f"normalization has {len(self.normalization.mean)} channels, {self.dataset} has "
                             f"{SPECS[self.dataset].channels}")
        return self


def check_names(external: dict[str, ExternalModel], reserved: list[str]) -> None:
    """Model names must be file names and must not shadow a trained model (standard, finetune instances)."""
    for name in external:
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError(f"external.{name}: a model name may hold letters, digits, '_', '.', '-' only")
        if name in reserved:
            raise ValueError(f"external.{name}: the name is taken by a trained model ({', '.join(reserved)})")
