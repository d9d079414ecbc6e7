"""The `corruption` params section and the canonical corruption names.

Kept free of heavy imports (no OpenCV, SciPy, scikit-image): `pipeline_lib.config`
imports this module, so every stage loads it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..schema import StrictModel

# The 15 corruptions of CIFAR-10-C / CIFAR-100-C in their published order; the mean
# corruption accuracy (RobustBench's corruptions_acc) averages over these.
STANDARD: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
# The 4 held-out corruptions released alongside them; reported apart, never in the mean.
EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL: tuple[str, ...] = STANDARD + EXTRA
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


class CorruptionParams(StrictModel):
    """Corruption robustness: the corrupted test set (`corrupt` stage) and its evaluation (`corruption@<model>`)."""

    # generated: made by the `corrupt` stage for any dataset with the CIFAR-C parameter table;
    # released: the published CIFAR-10-C / CIFAR-100-C (Zenodo), cifar10 / cifar100 only.
    source: Literal["generated", "released"] = "generated"
    corruptions: list[str] = Field(default_factory=lambda: list(STANDARD), min_length=1)
    extra: list[str] = Field(default_factory=lambda: list(EXTRA))
    n_images: int = Field(default=500, ge=1)    # first n test images, at each of the 5 severities
    seed: int = 0                               # generator seed (per corruption, severity and image)
    download: bool = False                      # released: fetch the archive from Zenodo when absent
    batch_size: int = Field(default=500, ge=1)  # evaluation batch size

    @field_validator("corruptions", "extra")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in ALL]
        if unknown:
            raise ValueError(f"unknown corruption(s) {unknown}; known: {', '.join(ALL)}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate corruption names in {names}")
        return names

    @model_validator(mode="after")
    def _disjoint(self) -> CorruptionParams:
        both = sorted(set(self.corruptions) & set(self.extra))
        if both:
            raise ValueError(f"{both} listed in both `corruptions` (averaged) and `extra` (reported apart)")
        return self

    @property
    def names(self) -> list[str]:
        """Every corruption to make and evaluate: the averaged ones first, then the extra ones."""
        return [*self.corruptions, *self.extra]
