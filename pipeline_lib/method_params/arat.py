"""AR-AT's params (pipeline_lib/methods/arat.py, whose docstring explains the ablations and SWA)."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..schema import StrictModel
from . import register_params


@register_params("arat")
class ARATParams(StrictModel):
    # Modules whose outputs are regularised (dotted names of the *original* model,
    # e.g. "layer4.0.bn1"); None = the feature layers the model declares (methods/arat.py: default_layers).
    layers: list[str] | None = None
    # total invariance weight; None = DEFAULT_GAMMA (methods/arat.py)
    gamma: float | None = Field(default=None, ge=0)
    stop_gradient: bool = True          # false = symmetric ablation: gradient also flows into the clean branch
    predictor: bool = True              # false = ablation: identity instead of the per-layer predictor
    predictor_hidden_ratio: float = Field(default=0.25, gt=0, le=1)  # predictor bottleneck = ratio * d
    split_bn: bool = True               # false = ablation: one BN shared by clean and adversarial inputs
    auto_balance: bool = True           # w_a = clean-BN train accuracy, w_c = 1 - w_a, each epoch
    balance_images: int = Field(default=1000, ge=1)      # training images the accuracy is measured on
    adv_weight: float | None = Field(default=None, ge=0)    # fixed w_a (only with auto_balance: false; default 1)
    clean_weight: float | None = Field(default=None, ge=0)  # fixed w_c (only with auto_balance: false; default 1)
    swa_start: int | None = Field(default=None, ge=1)    # 1-based epoch SWA averaging starts at; None = no SWA
    swa_every: int = Field(default=1, ge=1)              # steps between SWA updates (official 500), see docstring
    swa_bn_batches: int | None = Field(default=None, ge=1)  # batches for the BN recompute; None = all (official)

    @model_validator(mode="after")
    def _consistent(self) -> ARATParams:
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers: give at least one module name, or null for the architecture default")
            dup = sorted({n for n in self.layers if self.layers.count(n) > 1})
            if dup:
                raise ValueError(f"layers: duplicate module names {dup}")
        if self.auto_balance and (self.adv_weight is not None or self.clean_weight is not None):
            raise ValueError(f"adv_weight={self.adv_weight} / clean_weight={self.clean_weight} are fixed CE "
                             "weights: they need auto_balance: false")
        return self
