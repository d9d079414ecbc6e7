"""CURE: Conserve-Update-Revise (Gowda, Zonooz, Arani, ICLR 2024; code NeurAI-Lab/CURE).

Starts from a naturally trained model (init: pretrained). One step, x: (B, C, H, W) in [0, 1]:

    x_adv  = TRADES attack: maximise KL(p(x) || p(x + delta)) from x + 0.001 N(0, 1) (trades.py)
             (steps, step size, eps and model mode from the training attack settings)
    L_adv  = CE(f(x), y) + beta * KL(p(x) || p(x_adv))
    L_CR   = KL(p(x; theta_rev) || p(x; theta)) + KL(p(x_adv; theta_rev) || p(x_adv; theta))
    loss   = L_adv + gamma * L_CR                                     (revision on)

  Conserve/Update (rgp.py): before the optimizer step, per conv/linear weight, the gradient of
  the p% of weights with the lowest RGP = alpha |dCE(x)/dw| + (1 - alpha) |dL(x_adv)/dw| is zeroed
  (`rgp_variant: paper`); `rgp_variant: official` is the official code's `rgp_soft`: signed sum,
  entries below the p-th percentile zeroed, only the `conv1` weights of the residual blocks.
  Revise (revision.py): after the step, with probability r, theta_rev <- d theta_rev + (1 - d) theta.

Modes. The attack runs in `attack.bn_mode` (eval: BN running statistics, as TRADES/CURE code);
the two loss forwards of theta run in the mode the loop put the model in (train); the revision
model's forward always runs in train mode (BN batch statistics, detached, as the official code's
`model_ema.train()`), so theta_rev == theta gives L_CR = 0 exactly and the revision model's
never-averaged BN buffers play no role.

The model saved and evaluated is theta, the trained one (`export_model`), not theta_rev.
Ablations are param changes: `rgp: false` (no mask), `revision: false` (no revision model,
no L_CR; gamma then unused).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..method_params.cure import CureParams, RGPLayers
from ..schema import StrictModel
from .base import ObjectiveContext, StepOutput, register_objective
from .losses import kl_per_example
from .revision import RevisionModel
from .rgp import mask_gradients, prominence, select_weights
from .trades import Trades

# The tensors each RGP variant masks when `rgp_layers` is null: the paper's every conv and linear
# weight, the official code's `'conv1' in name` (stem excluded).
VARIANT_LAYERS: dict[str, RGPLayers] = {"paper": "conv_linear", "official": "conv1"}


@register_objective("cure")
class CURE(Trades):
    """TRADES loss + RGP gradient mask + revision model; see the module docstring."""

    Params = CureParams
    params: CureParams

    def __init__(self, params: StrictModel, ctx: ObjectiveContext) -> None:
        super().__init__(params, ctx)
        self.revision: RevisionModel | None = None   # built in prepare_model when params.revision
        self.rgp_names: list[str] = []               # weights RGP masks, resolved in prepare_model
        self._prepared = False
        self._pending: dict[str, Tensor] | None = None  # RGP of the current step, name -> (shape of w)
        self._epoch_counts = {"steps": 0, "revisions": 0, "zeroed": 0, "masked_total": 0}

    # -- setup ---------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Resolve the RGP layers and snapshot theta as the initial revision model (no grad)."""
        pr = self.params
        layers = pr.rgp_layers or VARIANT_LAYERS[pr.rgp_variant]
        self.rgp_names = select_weights(model, layers, pr.rgp_exclude) if pr.rgp else []
        # Not in extra_modules(): the optimizer must never see theta_rev; it moves only by EMA.
        self.revision = RevisionModel(model, r=pr.r, d_max=pr.d, seed=self.ctx.seed) if pr.revision else None
        self._prepared = True
        return model

    @property
    def rgp_scores(self) -> dict[str, Tensor] | None:
        """RGP of the step in progress (name -> tensor shaped like the weight), set by loss() and
        consumed by before_optimizer_step(); None outside that window or with RGP off."""
        return self._pending

    def _rgp_weights(self, model: nn.Module) -> list[nn.Parameter]:
        """The selected weights of `model` (empty with RGP off), by the names prepare_model resolved."""
        named = dict(model.named_parameters())
        missing = [n for n in self.rgp_names if n not in named]
        if missing:
            raise KeyError(f"CURE: RGP weights {missing} are not parameters of this model "
                           "(was prepare_model called on a different model?)")
        return [named[n] for n in self.rgp_names]

    def _require_prepared(self) -> None:
        if not self._prepared:
            raise RuntimeError("CURE: call prepare_model(model) before loss() and the step hooks")

    # -- the objective -------------------------------------------------------------------------
    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        self._require_prepared()
        pr = self.params
        weights = self._rgp_weights(model) if pr.p > 0 else []     # checked before any work
        x_adv = self.trades_adversarial(model, x, y)
        logits_nat = model(x)                                       # (B, K), model's own mode (train)
        logits_adv = model(x_adv)                                   # (B, K)
        loss_nat = F.cross_entropy(logits_nat, y)
        loss_kl = kl_per_example(logits_nat, logits_adv).mean()     # batchmean, grads through both
        loss = loss_nat + pr.beta * loss_kl
        stats: dict[str, Any] = {"ce_nat": loss_nat.detach(), "kl": loss_kl.detach()}

        if self.revision is not None:
            rev_nat = self.revision.predict(x)                     # (B, K), detached
            rev_adv = self.revision.predict(x_adv)
            loss_cr = kl_per_example(rev_nat, logits_nat).mean() + kl_per_example(rev_adv, logits_adv).mean()
            loss = loss + pr.gamma * loss_cr
            stats["loss_cr"] = loss_cr.detach()

        self._pending = None
        if weights:
            loss_rgp_adv = loss_kl if pr.rgp_adv_loss == "kl" else F.cross_entropy(logits_adv, y)
            scores = prominence(loss_nat, loss_rgp_adv, weights, pr.alpha, signed=pr.rgp_variant == "official")
            self._pending = dict(zip(self.rgp_names, scores, strict=True))
        return StepOutput(loss, logits_adv, stats)

    # -- step hooks ----------------------------------------------------------------------------
    def before_optimizer_step(self, model: nn.Module) -> None:
        """Conserve: zero the gradient of the p% lowest-RGP weights of each selected layer (.grad only)."""
        self._require_prepared()
        if not self.rgp_names or self.params.p == 0:
            return
        if self._pending is None:
            raise RuntimeError("CURE: before_optimizer_step without a preceding loss() (no RGP for this step)")
        zeroed, total = mask_gradients(dict(model.named_parameters()), self._pending, self.params.p,
                                       self.params.rgp_variant)
        self._pending = None
        self._epoch_counts["zeroed"] += zeroed
        self._epoch_counts["masked_total"] += total

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Revise: with probability r, theta_rev <- d theta_rev + (1 - d) theta (parameters only)."""
        self._require_prepared()
        self._epoch_counts["steps"] += 1
        if self.revision is not None and self.revision.maybe_update(model, step):
            self._epoch_counts["revisions"] += 1

    def on_epoch_start(self, model: nn.Module, epoch: int, loader: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
        self._epoch_counts = dict.fromkeys(self._epoch_counts, 0)
        return {}

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        c = self._epoch_counts
        out: dict[str, float] = {}
        if self.revision is not None and c["steps"]:
            out["revision_update_rate"] = c["revisions"] / c["steps"]   # should be close to r
        if c["masked_total"]:
            out["rgp_zeroed_frac"] = c["zeroed"] / c["masked_total"]    # close to p / 100
        return out

    # -- state and export ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"revision": self.revision.state_dict()} if self.revision is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.revision is None:
            if "revision" in state:
                raise ValueError("CURE: the saved state has a revision model but params.revision is false")
            return
        if "revision" not in state:
            raise KeyError("CURE: the saved state has no revision model (call prepare_model first, and "
                           "resume only a run with revision: true)")
        self.revision.load_state_dict(state["revision"])

    def export_model(self, model: nn.Module) -> nn.Module:
        """The trained model theta (CURE reports theta, not the revision model)."""
        return model

