"""AR-AT: Asymmetrically Representation-regularized Adversarial Training (Waseda et al., ICLR 2025).

Per step, with x: (B, C, H, W) in [0, 1] and y: (B,):

    x_adv = PGD(x) through the adversarial BN, network in train mode
    L = w_a * CE(f_adv(x_adv), y) + w_c * CE(f_clean(x), y) + sum_l (gamma / |L|) * D_l
    D_l = 1 - mean_b cos(p_l(z_adv_l), stopgrad(z_clean_l))

f_clean / f_adv are the same network with the clean / adversarial BatchNorm
(`split_bn`): conv and linear weights are shared. z_l = GAP(ReLU(output of the
module named l)), shape (B, d_l). p_l is a SimSiam-style predictor, one per
layer, applied to the adversarial branch only, and the clean features are
detached: the adversarial representation moves towards the clean one and not
the other way round (the asymmetry that keeps clean accuracy).

Auto-balance (default): w_a = acc, w_c = 1 - acc, acc = clean-BN training
accuracy in eval mode, measured at each epoch start: while clean accuracy is low
the clean branch gets the weight, then the adversarial one does.

The attack always runs in train mode through the adversarial BN (paper and
official code): the objective enforces this, whatever `attack.bn_mode` says.

Ablations are params: `stop_gradient: false` (symmetric, gradient also into the
clean branch), `predictor: false` (identity), `split_bn: false` (one shared BN).
Optional SWA (`swa_start`), on the official code's schedule: the parameters are averaged
(equal weights) at every step whose official index `epoch * len(loader) + batch`
(epoch 1-based, batch 0-based) is a multiple of `swa_every` (official 500), from epoch
`swa_start` on (official 76); at export the BN statistics are recomputed through the
adversarial BN on PGD examples of the whole training set (official; `swa_bn_batches`
caps the number of batches). One official quirk is not reproduced: its recompute
runs the attack in train mode *after* resetting the statistics, so the attack's own
forwards leak into them; here the recompute is a clean cumulative average over the
final forwards only (torch's update_bn).

The evaluated model (`export_model`) is the original architecture with the
adversarial BN, used for clean and robust accuracy alike.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, update_bn
from tqdm.auto import tqdm

from ..attacks import pgd_linf
from ..evaluation.accuracy import accuracy
from ..method_params.arat import ARATParams
from ..runtime import evaluating, preserve_mode
from .base import Objective, ObjectiveContext, StepOutput, register_objective
from .split_bn import bn_branch, merge_branch, split_batchnorm


# The paper's weight on ResNet-18, and this project's on SmallCNN (Fashion-MNIST, eps 0.1, 3-epoch finetune:
# 10 and 30 equal within noise, 100 worse). The paper uses 100 on WRN-34-10: its profile part sets it.
DEFAULT_GAMMA = 30.0


def default_layers(model: nn.Module) -> list[str]:
    """The layers AR-AT regularises by default: the feature layers `model` declares (its last stage,
    e.g. both BNs of every block of ResNet-18's layer4; models.base.ImageClassifier.feature_layers)."""
    declared = getattr(model, "feature_layers", None)
    if declared is None:
        raise ValueError(f"AR-AT has no default layers for {type(model).__name__}, which declares no feature "
                         "layers: set `layers` (module names) in the method's params")
    return declared()


def pooled(t: Tensor) -> Tensor:
    """z = GAP(ReLU(t)): (B, C, *spatial) -> (B, C); (B, D) -> (B, D)."""
    t = F.relu(t)
    return t.flatten(2).mean(2) if t.ndim > 2 else t


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - mean_b cos(a_b, b_b) for a, b: (B, D) -> scalar."""
    return 1 - F.cosine_similarity(a, b, dim=1).mean()


def make_predictor(d: int, ratio: float) -> nn.Sequential:
    """SimSiam-style predictor: Linear(d, h, no bias) -> BN1d -> ReLU -> Linear(h, d), h = max(1, ratio * d)."""
    h = max(1, int(d * ratio))
    return nn.Sequential(nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, d))


@contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the output of each named module during the block (forward hooks, removed on exit).

    A module that runs more than once per capture would make "its output" ambiguous: that is an error.
    """
    modules = dict(model.named_modules())
    outputs: dict[str, Tensor] = {}

    def hook_for(name: str) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            if name in outputs:
                raise RuntimeError(f"module {name!r} ran more than once in one forward pass; "
                                   "AR-AT needs layers that run once (name another module)")
            outputs[name] = output
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def first_images(loader: Iterable[tuple[Tensor, Tensor]], n: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The loader's batches up to exactly n examples (the last batch cut)."""
    left = n
    for x, y in loader:
        yield x[:left], y[:left]
        left -= len(y)
        if left <= 0:
            return


@register_objective("arat")
class ARAT(Objective):
    Params = ARATParams

    def __init__(self, params: ARATParams, ctx: ObjectiveContext) -> None:  # type: ignore[override]
        # AR-AT's attack runs in train mode (BN batch statistics) through the adversarial BN,
        # whatever `attack.bn_mode` says: the objective owns this choice (paper and official code).
        ctx = dataclasses.replace(ctx, attack=ctx.attack.model_copy(update={"bn_mode": "train"}))
        super().__init__(params, ctx)
        self.params: ARATParams = params
        self.layers: list[str] = []
        self.gamma: float = 0.0
        self.balance_acc: float | None = None    # clean-BN training accuracy of this epoch
        self._loader: Iterable[tuple[Tensor, Tensor]] | None = None  # for SWA's BN recompute
        self._epoch = 0
        self._batch = 0                          # optimizer steps taken in the current epoch
        self._swa: AveragedModel | None = None

    # -- setup ---------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        p = self.params
        layers = default_layers(model) if p.layers is None else p.layers   # raises for an undeclared model
        gamma = DEFAULT_GAMMA if p.gamma is None else p.gamma
        # Resolve the names on the original model: the surgery keeps each BN's dotted name
        # (the SplitBatchNorm sits where the BN was), so the same names hook the split model.
        known = dict(model.named_modules())
        for name in layers:
            if name not in known or not name:
                close = difflib.get_close_matches(name, [n for n in known if n], n=5)
                raise ValueError(f"AR-AT layers: {type(model).__name__} has no module named {name!r}"
                                 + (f"; close names: {', '.join(close)}" if close else ""))
        self.layers, self.gamma = list(layers), float(gamma)
        if p.split_bn:
            split_batchnorm(model)
        if p.swa_start is not None:
            self._swa = AveragedModel(model)
        if p.predictor:
            dims = self._feature_dims(model)
            self._extra["predictors"] = nn.ModuleList(
                make_predictor(dims[n], p.predictor_hidden_ratio) for n in self.layers
            ).to(next(model.parameters()).device)
        return model

    def _feature_dims(self, model: nn.Module) -> dict[str, int]:
        """d_l of each regularised layer, from one dummy forward (eval mode: no BN statistic moves)."""
        dev = next(model.parameters()).device
        with torch.no_grad(), evaluating(model), capture_outputs(model, self.layers) as out:
            model(torch.zeros(2, *self.ctx.input_shape, device=dev))
        missing = [n for n in self.layers if n not in out]
        if missing:
            raise ValueError(f"AR-AT layers {missing} never run in {type(model).__name__}'s forward pass")
        return {n: pooled(out[n]).shape[1] for n in self.layers}

    # -- per epoch -----------------------------------------------------------------------------
    def on_epoch_start(self, model: nn.Module, epoch: int, loader: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
        self._epoch, self._loader, self._batch = epoch, loader, 0
        if not self.params.auto_balance:
            return {}
        self.balance_acc = self.clean_accuracy(model, loader)
        return {"balance_clean_acc": self.balance_acc}

    def clean_accuracy(self, model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> float:
        """Clean-BN accuracy (eval mode) on the loader's first `balance_images` examples.

        The global RNG is forked so that iterating the loader here cannot change the
        batches the epoch then trains on (BatchLoader seeds its own generator anyway).
        """
        dev = next(model.parameters()).device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), bn_branch(model, "clean"):
            return accuracy(model, first_images(loader, self.params.balance_images))

    def ce_weights(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
        """(w_a, w_c) for this step."""
        p = self.params
        if not p.auto_balance:
            return (1.0 if p.adv_weight is None else p.adv_weight), (1.0 if p.clean_weight is None else p.clean_weight)
        if self.balance_acc is None:  # loss() before any on_epoch_start (a direct call): measure on this batch
            self.balance_acc = self.clean_accuracy(model, [(x, y)])
        return self.balance_acc, 1.0 - self.balance_acc

    # -- the objective -------------------------------------------------------------------------
    def loss_terms(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The three terms of the loss, unweighted except the invariance term (gamma / |L| included).

        Returns ce_adv, ce_clean, invariance (scalars), logits_adv (B, K) and dist (|L|,) per-layer D_l.
        """
        with bn_branch(model, "adv"):
            x_adv = self.adversarial(model, x, y)           # train mode: see __init__
        with bn_branch(model, "clean"), capture_outputs(model, self.layers) as feat_clean:
            logits_clean = model(x)
        with bn_branch(model, "adv"), capture_outputs(model, self.layers) as feat_adv:
            logits_adv = model(x_adv)
        predictors = self._extra["predictors"] if self.params.predictor else [nn.Identity()] * len(self.layers)
        dists = []
        for name, pred in zip(self.layers, predictors, strict=True):
            z_adv, z_clean = pooled(feat_adv[name]), pooled(feat_clean[name])   # (B, d_l) each
            if self.params.stop_gradient:
                z_clean = z_clean.detach()
            dists.append(cosine_distance(pred(z_adv), z_clean))
        dist = torch.stack(dists)
        return {"ce_adv": F.cross_entropy(logits_adv, y), "ce_clean": F.cross_entropy(logits_clean, y),
                "invariance": self.gamma / len(self.layers) * dist.sum(), "logits_adv": logits_adv, "dist": dist}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        w_a, w_c = self.ce_weights(model, x, y)
        t = self.loss_terms(model, x, y)
        total = w_a * t["ce_adv"] + w_c * t["ce_clean"] + t["invariance"]
        return StepOutput(total, t["logits_adv"], {
            "ce_adv": t["ce_adv"].detach(), "ce_clean": t["ce_clean"].detach(),
            "invariance": t["invariance"].detach(), "cos_dist": t["dist"].detach().mean(),
            "w_adv": torch.tensor(w_a, dtype=torch.float64)})   # a per-epoch constant: a CPU tensor, no device copy

    # -- SWA -----------------------------------------------------------------------------------
    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        p = self.params
        batch, self._batch = self._batch, self._batch + 1
        if self._swa is None or self._epoch + 1 < p.swa_start:  # type: ignore[operator]
            return
        # The official step index (train_ARAT.py): 1-based epoch * batches per epoch + 0-based batch.
        per_epoch = len(self._loader) if isinstance(self._loader, Sized) else batch + 1
        if ((self._epoch + 1) * per_epoch + batch) % p.swa_every == 0:
            self._swa.update_parameters(model)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        return {} if self._swa is None else {"swa_n_averaged": float(self._swa.n_averaged)}

    # -- resumable state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.balance_acc is not None:   # the current epoch's CE weights
            state["balance_acc"] = self.balance_acc
        if self._swa is not None:
            state["swa"] = self._swa.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.balance_acc = state.get("balance_acc")
        if "swa" in state:
            if self._swa is None:
                raise ValueError("AR-AT state holds an SWA average but swa_start is not set")
            self._swa.load_state_dict(state["swa"])

    # -- test time -----------------------------------------------------------------------------
    def export_model(self, model: nn.Module) -> nn.Module:
        """The evaluated model: original architecture, adversarial BN (SWA average if enabled)."""
        if self._swa is not None and int(self._swa.n_averaged) > 0:
            return self._swa_export()
        if self._swa is not None:
            warnings.warn(f"AR-AT: swa_start={self.params.swa_start} was never reached; exporting the "
                          "last weights instead of an average", RuntimeWarning, stacklevel=2)
        return merge_branch(model, "adv") if self.params.split_bn else model

    def _swa_export(self) -> nn.Module:
        """Averaged weights with the BN statistics recomputed on PGD examples through the adv BN."""
        assert self._swa is not None
        if self._loader is None:
            raise RuntimeError("AR-AT SWA export needs training batches: on_epoch_start was never called")
        avg: nn.Module = self._swa.module
        plain = merge_branch(avg, "adv") if self.params.split_bn else copy.deepcopy(avg)
        a = self.ctx.attack
        gen = torch.Generator().manual_seed(self.ctx.seed * 10_007 + 0x5A)  # own stream: export is reproducible
        x_advs = []
        with preserve_mode(plain):
            # Train mode: BN normalises with batch statistics, as in training's attack, so
            # the examples do not depend on the (about to be reset) running statistics.
            plain.train()
            n_bn = self.params.swa_bn_batches
            batches = self._loader if n_bn is None else itertools.islice(self._loader, n_bn)
            total = n_bn if n_bn is not None or not isinstance(self._loader, Sized) else len(self._loader)
            for x, y in tqdm(batches, desc="arat swa bn", total=total, leave=False, mininterval=1.0):
                x_advs.append(pgd_linf(plain, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps,
                                       random_start=a.random_start, generator=gen))
            update_bn(x_advs, plain)  # resets the stats, then a cumulative average over the batches
        return plain
