"""Every evaluation attack: stays in the eps ball and the image range; PGD and CW beat FGSM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eval_support import eval_params, fit, steps_for
from pipeline_lib.attacks.cw import cw_linf
from pipeline_lib.attacks.fgsm import fgsm_linf
from pipeline_lib.evaluation.autoattack import build_autoattack, run_component
from pipeline_lib.evaluation.cascade import check_adversarial, run_cascade
from pipeline_lib.evaluation.config import AutoAttackName, AutoAttackParams
from pipeline_lib.evaluation.registry import EVAL_ATTACKS
from pipeline_lib.evaluation.record_metrics import accuracies

EPS = 0.02   # the fitted tiny model: FGSM leaves ~20% of the batch, PGD ~0%



@pytest.fixture
def trained(tiny_model: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    return fit(tiny_model, *tiny_batch).requires_grad_(False)


def _assert_valid(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


@pytest.mark.parametrize("name", EVAL_ATTACKS.names())
def test_every_registered_attack_stays_in_the_ball_and_the_image_range(
        trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor], name: str) -> None:
    x, y = tiny_batch[0][:16], tiny_batch[1][:16]
    steps = steps_for(trained, eval_params(attacks=[name], eps_sweep=[0.01]), EPS)
    assert [st.name for st in steps][-1] == "pgd_eps_0.01"      # the sweep step is checked too
    for st in steps:
        x_adv = st.run(x, y, torch.Generator().manual_seed(0))
        _assert_valid(x, x_adv, st.eps)
        if st.name != "autoattack/apgd-t":     # (APGD-T may find nothing left to attack)
            assert bool((trained(x_adv).argmax(1) != y).any()), f"{st.name} broke nothing at eps={st.eps}"


@pytest.mark.parametrize("component", list(AutoAttackName.__args__))
def test_every_autoattack_component_stays_in_the_ball_and_the_image_range(
        trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor], component: str) -> None:
    x, y = tiny_batch[0][:6], tiny_batch[1][:6]
    params = AutoAttackParams.model_validate(
        {"version": "custom", "custom": {"attacks": [component], "target_classes": 1, "square_queries": 50}})
    aa = build_autoattack(trained, params, eps=EPS, seed=0, device="cpu")
    x_adv = run_component(aa, component, x, y, batch_size=6)
    _assert_valid(x, x_adv, EPS)
    kept = trained(x_adv).argmax(1) == y
    assert torch.equal(x_adv[kept], x[kept]), "examples the component did not break come back unchanged"


def test_pgd_and_cw_are_at_least_as_strong_as_fgsm_on_a_trained_model(
        trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = tiny_batch
    e = eval_params(attacks=["fgsm", "pgd", "cw"], pgd={"steps": 10, "step_size": EPS / 4},
                    cw={"steps": 10, "step_size": EPS / 4})
    acc = accuracies(run_cascade(trained, x, y, steps_for(trained, e, EPS), batch_size=16, seed=0,
                                 progress=False), steps_for(trained, e, EPS))
    assert acc["clean_acc"] == 1.0
    assert acc["fgsm_acc"] < 1.0, "FGSM must do something for the comparison to mean anything"
    assert acc["pgd_acc"] <= acc["fgsm_acc"] and acc["cw_acc"] <= acc["fgsm_acc"]
    assert acc["worst_case_acc"] <= min(acc["fgsm_acc"], acc["pgd_acc"], acc["cw_acc"])


def test_fgsm_is_one_full_signed_step(trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = tiny_batch
    x_adv = fgsm_linf(trained, x, y, eps=EPS)
    inner = (x > EPS) & (x < 1 - EPS)   # pixels the [0, 1] clamp cannot touch
    moved = (x_adv - x).abs()[inner]
    assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], EPS), atol=1e-6)
    assert float((moved > 0).float().mean()) > 0.5   # sign(grad) is zero only where the gradient is
    with pytest.raises(ValueError, match="eps"):
        fgsm_linf(trained, x, y, eps=0.0)


def test_cw_attack_raises_the_cw_margin(trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = tiny_batch

    def margin(z: torch.Tensor) -> torch.Tensor:
        other = z.clone().scatter_(1, y[:, None], float("-inf"))
        return other.max(1).values - z.gather(1, y[:, None]).squeeze(1)

    x_adv = cw_linf(trained, x, y, eps=EPS, step_size=EPS / 4, steps=10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(margin(trained(x_adv)).mean()) > float(margin(trained(x)).mean())


def test_check_adversarial_rejects_an_attack_that_leaves_the_ball_or_the_range(
        tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x = tiny_batch[0].clone()
    x[0, 0, 0, 0] = 1.0      # a saturated pixel, so an unclamped step leaves [0, 1]
    check_adversarial(x, (x + 0.01).clamp(0, 1), 0.01, "ok")
    with pytest.raises(RuntimeError, match="left the eps ball"):
        check_adversarial(x, (x + 0.02).clamp(0, 1), 0.01, "too far")
    with pytest.raises(RuntimeError, match="image range"):
        check_adversarial(x, x + 0.01, 0.01, "unclamped")
    with pytest.raises(RuntimeError, match="shape"):
        check_adversarial(x, x[:4], 0.01, "short")
