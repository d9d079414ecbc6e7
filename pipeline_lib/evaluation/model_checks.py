"""Refuse models an attack would evaluate wrongly, before any attack runs.

* Train mode: BatchNorm would use batch statistics (and update running ones),
  dropout would randomise outputs; the number would not be the model's robustness.
  The caller chooses the mode deliberately (AR-AT exports its adversarial BN), so
  a model in train mode is an error, not something to fix silently.
* Probabilities instead of logits: a final softmax flattens the cross-entropy
  gradient (gradient masking) and breaks the CW margin; the attacks need logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from ..errors import UserError


class ModelCheckError(UserError, ValueError):
    """The model cannot be evaluated as given (message names what is wrong and the fix)."""


def check_eval_mode(model: nn.Module) -> None:
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:4]) + (f" and {len(training) - 4} more" if len(training) > 4 else "")
        raise ModelCheckError(f"the model is in train mode ({shown}): call model.eval() first; "
                              "attacks on a train-mode model measure batch statistics, not the model")


@torch.no_grad()
def check_logits(model: nn.Module, x_probe: Tensor, num_classes: int | None = None, atol: float = 1e-4) -> None:
    """model(x_probe) must be finite logits of shape (B, num_classes), not probabilities."""
    out = model(x_probe)
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != len(x_probe):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelCheckError(f"the model must return logits of shape (batch, classes); for a batch of "
                              f"{len(x_probe)} it returned {shape}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ModelCheckError(f"the model returns {out.shape[1]} outputs per example, the dataset has "
                              f"{num_classes} classes")
    if not torch.isfinite(out).all():
        raise ModelCheckError("the model returns non-finite outputs (nan or inf) on clean test images")
    sums = out.sum(1)
    if bool((out >= 0).all()) and bool(((sums - 1).abs() <= atol).all()):
        raise ModelCheckError("the model returns probabilities (non-negative rows summing to 1), not logits: "
                              "remove its final softmax; attacks on probabilities suffer vanishing gradients")


def check_eval_model(model: nn.Module, x_probe: Tensor, num_classes: int | None = None) -> None:
    """Both checks; x_probe: a few clean inputs (B, C, H, W) on the model's device."""
    check_eval_mode(model)
    check_logits(model, x_probe, num_classes)
