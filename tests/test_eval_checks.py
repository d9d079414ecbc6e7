"""Models the evaluation must refuse (train mode, probabilities, wrong output shape) before any attack."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eval_support import eval_params, steps_for
from pipeline_lib.evaluation.cascade import run_cascade
from pipeline_lib.evaluation.model_checks import ModelCheckError, check_eval_model
from pipeline_lib.evaluation.registry import AttackStep


class _Counting:
    """Wraps every step's run function and counts the calls."""

    def __init__(self, steps: list[AttackStep]) -> None:
        self.calls = 0
        self.steps = [AttackStep(st.name, st.metric, st.eps, self._wrap(st.run), st.worst_case) for st in steps]

    def _wrap(self, fn):  # type: ignore[no-untyped-def]
        def run(x, y, gen):  # type: ignore[no-untyped-def]
            self.calls += 1
            return fn(x, y, gen)
        return run


def _refused(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], match: str) -> None:
    x, y = batch
    counting = _Counting(steps_for(model, eval_params(attacks=["fgsm", "pgd"]), 0.05))
    with pytest.raises(ModelCheckError, match=match):
        run_cascade(model, x, y, counting.steps, batch_size=16, seed=0, num_classes=10, progress=False)
    assert counting.calls == 0, "refused before any attack ran"


def test_a_model_in_eval_mode_with_logits_passes(tiny_model: nn.Module,
                                                 tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    check_eval_model(tiny_model.eval(), tiny_batch[0][:8], num_classes=10)


def test_a_model_in_train_mode_is_refused(tiny_model: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    _refused(tiny_model.train(), tiny_batch, "train mode")


def test_a_model_with_one_submodule_left_in_train_mode_is_refused(
        tiny_model: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    tiny_model.eval()
    tiny_model.fc_bn.train()      # e.g. a BN switched back by a hook that forgot to restore the mode
    _refused(tiny_model, tiny_batch, r"train mode \(fc_bn\)")


def test_a_model_that_outputs_probabilities_is_refused(
        tiny_model: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    _refused(nn.Sequential(tiny_model, nn.Softmax(dim=1)).eval(), tiny_batch, "probabilities")


def test_log_probabilities_are_valid_logits(tiny_model: nn.Module,
                                            tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    # log_softmax only shifts each row: argmax, cross-entropy and the CW margin are unchanged
    check_eval_model(nn.Sequential(tiny_model, nn.LogSoftmax(dim=1)).eval(), tiny_batch[0][:8], num_classes=10)


class _Flat(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).argmax(1).float()      # (B,): labels, not logits


def test_outputs_of_the_wrong_shape_are_refused(tiny_model: nn.Module,
                                                tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    _refused(_Flat(tiny_model).eval(), tiny_batch, r"logits of shape \(batch, classes\)")
    with pytest.raises(ModelCheckError, match="returns 10 outputs per example, the dataset has 100"):
        check_eval_model(tiny_model.eval(), tiny_batch[0][:8], num_classes=100)
