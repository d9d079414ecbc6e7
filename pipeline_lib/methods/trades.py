"""TRADES (Zhang et al., ICML 2019): CE on clean inputs plus beta * KL(p(x) || p(x_adv)).

As the official code (yaodongyu/TRADES, `trades_loss`):
* attack: maximise KL(p(x) || p(x')) from x' = x + init_std * N(0, 1) with the training
  attack's eps / step_size / steps, in the mode `ctx.attack.bn_mode` asks for (default eval,
  as the official code); p(x) is fixed (computed once, no gradient) during the attack;
* loss: CE(f(x), y) + beta * KL(p(x) || p(x_adv)) with `batchmean` reduction, both forwards
  in the loop's (train) mode and separately (their own BatchNorm batch statistics), the
  gradient flowing through p(x) too. beta = 6 is the paper's CIFAR-10 setting.

Two official details are params (pipeline_lib/method_params/trades.py: TradesStartParams, TradesParams):
* `clamp_start: false` (official): the start x + 0.001 N(0, 1) enters the first attack forward
  unprojected (slightly outside [0, 1] at black or white pixels); true projects it first.
* `three_forwards: true` (official): the loss makes three train-mode forwards, f(x) for the CE,
  f(x_adv), then f(x) again for the KL's p(x). The third forward gives the same outputs and the
  same gradient (batch statistics of the same batch) but moves the BN running statistics a third
  time (clean, adv, clean), which changes the evaluated model; false makes two (clean, adv).

The train accuracy the loop logs is measured on the adversarial logits (as for PGD-AT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..method_params.trades import TradesParams
from ..runtime import preserve_mode
from .base import Objective, StepOutput, register_objective
from .losses import gaussian_start, kl_per_example


@register_objective("trades")
class Trades(Objective):
    Params = TradesParams
    params: TradesParams   # CURE (a subclass) has CureParams: same attack-start fields

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        x_adv = self.trades_adversarial(model, x, y)
        logits_nat = model(x)       # (B, K), loop's mode
        logits_adv = model(x_adv)   # (B, K)
        ce = F.cross_entropy(logits_nat, y)
        p_nat = model(x) if self.params.three_forwards else logits_nat   # (B, K), the official 3rd forward
        kl = kl_per_example(p_nat, logits_adv).mean()  # batchmean
        # float64 stats: the epoch sums as exact as the Python floats they were (the history CSV is unchanged)
        stats = {"ce_nat": ce.detach().double(), "kl": kl.detach().double()}
        return StepOutput(ce + self.params.beta * kl, logits_adv, stats)

    def trades_adversarial(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """x_adv (B, C, H, W) maximising KL(p(x) || p(x_adv)) within the training eps-ball."""
        with torch.no_grad(), preserve_mode(model):
            model.train(self.ctx.attack.bn_mode == "train")
            logits_ref = model(x)  # p(x) of the attack, fixed while it runs
        x_init = gaussian_start(x, self.params.init_std, self.ctx.generator)
        return self.adversarial(model, x, y, loss_fn=lambda logits, _y: kl_per_example(logits_ref, logits),
                                x_init=x_init, project_init=self.params.clamp_start)
