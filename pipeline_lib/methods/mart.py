"""MART (Wang et al., ICLR 2020): misclassification-aware adversarial training.

As the official code (YisenWang/MART, `mart_loss`):
* attack: PGD on CE from x' = x + init_std * N(0, 1) with the training attack's
  eps / step_size / steps, in the mode `ctx.attack.bn_mode` asks for (default eval);
* loss (`mart_loss_from_logits`), with p = softmax:
      BCE = CE(f(x_adv), y) - log(1.0001 - p_k(x_adv) + 1e-12),  k = argmax_{j != y} p_j(x_adv)
      L   = mean_i BCE_i + beta * mean_i KL(p(x_i) || p(x_adv_i)) * (1.0000001 - p_y(x_i))
  with the official constants, gradients through every term (also the weight 1 - p_y(x)).
  beta = 6 is the paper's CIFAR-10 setting. The KL is computed from log-softmaxes instead of
  log(p + 1e-12): equal up to that 1e-12 and finite for saturated outputs.

The train accuracy the loop logs is measured on the adversarial logits (as for PGD-AT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..method_params.mart import MartParams
from .base import Objective, StepOutput, register_objective
from .losses import gaussian_start, kl_per_example


def mart_loss_from_logits(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, bce, weighted kl) scalars of MART from logits (B, K) and labels (B,)."""
    adv_probs = F.softmax(logits_adv, dim=1)                              # (B, K)
    top2 = adv_probs.topk(2, dim=1).indices                               # (B, 2), most probable first
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])          # most probable wrong class
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
    true_nat = F.softmax(logits_nat, dim=1).gather(1, y[:, None]).squeeze(1)  # (B,) p_y(x)
    weighted_kl = (kl_per_example(logits_nat, logits_adv) * (1.0000001 - true_nat)).mean()
    return bce + beta * weighted_kl, bce, weighted_kl


@register_objective("mart")
class Mart(Objective):
    Params = MartParams
    params: MartParams

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        x_init = gaussian_start(x, self.params.init_std, self.ctx.generator)
        x_adv = self.adversarial(model, x, y, x_init=x_init, project_init=self.params.clamp_start)  # CE attack
        logits_nat = model(x)       # (B, K), loop's mode
        logits_adv = model(x_adv)   # (B, K)
        loss, bce, kl = mart_loss_from_logits(logits_nat, logits_adv, y, self.params.beta)
        # float64 stats: the epoch sums as exact as the Python floats they were (the history CSV is unchanged)
        stats = {"bce_adv": bce.detach().double(), "kl_weighted": kl.detach().double()}
        return StepOutput(loss, logits_adv, stats)
