"""PGD invariants on a small CNN trained to 100% clean accuracy on the tiny batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline_lib.attacks import ce_loss, cw_margin_loss, pgd_linf
from pipeline_lib.evaluation.accuracy import accuracy

_TRAINED: dict[str, dict[str, torch.Tensor]] = {}   # weights trained once per session


@pytest.fixture
def trained(tiny_model: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    """tiny_model fitted to tiny_batch (a few dozen Adam steps), in eval mode."""
    if "small_cnn" not in _TRAINED:
        x, y = tiny_batch
        opt = torch.optim.Adam(tiny_model.parameters(), lr=1e-2)
        tiny_model.train()
        for _ in range(40):
            opt.zero_grad()
            F.cross_entropy(tiny_model(x), y).backward()
            opt.step()
        _TRAINED["small_cnn"] = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tiny_model.load_state_dict(_TRAINED["small_cnn"])
    return tiny_model.eval()


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return accuracy(model, [(x, y)])


def _attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0, **kw: Any) -> torch.Tensor:
    settings: dict[str, Any] = {"eps": 0.1, "step_size": 0.025, "steps": 10, **kw}
    return pgd_linf(model, x, y, generator=torch.Generator().manual_seed(seed), **settings)


@pytest.mark.parametrize("loss_fn", [ce_loss, cw_margin_loss], ids=["ce", "cw"])
@pytest.mark.parametrize("eps", [0.03, 0.1])
def test_stays_in_the_ball_and_the_image_range(trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor],
                                               loss_fn: Any, eps: float) -> None:
    x, y = tiny_batch
    # A step larger than eps, so projection (not small steps) keeps x_adv in the ball.
    x_adv = _attack(trained, x, y, eps=eps, step_size=2 * eps, steps=5, loss_fn=loss_fn)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float((x_adv - x).abs().max()) > eps / 2      # it moved


def test_accuracy_drops_under_attack(trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = tiny_batch
    clean = _acc(trained, x, y)
    assert clean == 1.0, "the fixture model fits its batch"
    assert _acc(trained, _attack(trained, x, y), y) < clean
    # Random noise of the same size does far less than the attack.
    noise = (x + 0.1 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))).clamp(0, 1)
    assert _acc(trained, _attack(trained, x, y), y) < _acc(trained, noise, y)


def test_same_generator_seed_same_examples(trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = tiny_batch
    a, b, c = _attack(trained, x, y, seed=3), _attack(trained, x, y, seed=3), _attack(trained, x, y, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("setup", ["eval", "train", "mixed"])
def test_model_modes_are_untouched(trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor],
                                   setup: str) -> None:
    x, y = tiny_batch
    trained.train(setup != "eval")
    if setup == "mixed":
        trained.block1.eval()            # a frozen part inside a training model
    before = _modes(trained)
    _attack(trained, x, y, restarts=2, steps=2)
    assert _modes(trained) == before


def test_no_parameter_gradients_are_touched(trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = tiny_batch
    assert all(p.requires_grad for p in trained.parameters())
    _attack(trained, x, y, steps=3)
    assert all(p.grad is None for p in trained.parameters())
    # Gradients a training step already holds survive an attack in the middle of the step.
    F.cross_entropy(trained(x), y).backward()
    grads = [p.grad.clone() for p in trained.parameters()]
    _attack(trained, x, y, steps=3)
    assert all(torch.equal(p.grad, g) for p, g in zip(trained.parameters(), grads, strict=True))


def test_works_inside_no_grad(trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = tiny_batch
    expected = _attack(trained, x, y, steps=3)
    with torch.no_grad():
        got = _attack(trained, x, y, steps=3)
    assert torch.equal(got, expected)


def test_more_restarts_are_at_least_as_strong(trained: nn.Module,
                                              tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = tiny_batch
    # A weak attack (one step, small eps) so that a single restart leaves some examples correct.
    weak = {"eps": 0.02, "step_size": 0.02, "steps": 1}
    with torch.no_grad():
        robust1 = trained(_attack(trained, x, y, restarts=1, **weak)).argmax(1) == y
        robust4 = trained(_attack(trained, x, y, restarts=4, **weak)).argmax(1) == y
    assert robust1.any(), "precondition: one restart must leave something to gain"
    # The first restart uses the same noise as the single-restart run, and a fooled example keeps
    # its fooling restart: so every example fooled once stays fooled.
    assert bool((robust4 <= robust1).all())
    assert int(robust4.sum()) < int(robust1.sum())


def test_x_init_replaces_the_random_start(trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = tiny_batch
    eps = 0.1
    inside = (x + 0.5 * eps * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))).clamp(0, 1)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    out = pgd_linf(trained, x, y, eps=eps, step_size=0.01, steps=0, x_init=inside, generator=gen)
    assert torch.equal(out, inside)                       # zero steps: the start itself
    assert torch.equal(gen.get_state(), state)            # no random start was drawn
    # A start outside the ball or the image range is projected onto both.
    far = x + 0.5
    out = pgd_linf(trained, x, y, eps=eps, step_size=0.01, steps=0, x_init=far)
    assert torch.equal(out, torch.min(x + eps, torch.ones_like(x)))
    # With steps, the attack proceeds from x_init: different starts, different results.
    a = pgd_linf(trained, x, y, eps=eps, step_size=0.01, steps=2, x_init=inside)
    b = pgd_linf(trained, x, y, eps=eps, step_size=0.01, steps=2, x_init=x.clone())
    assert not torch.equal(a, b) and float((a - x).abs().max()) <= eps + 1e-6


def test_no_random_start_is_deterministic_without_generator(trained: nn.Module,
                                                            tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = tiny_batch
    a = pgd_linf(trained, x, y, eps=0.05, step_size=0.01, steps=2, random_start=False)
    b = pgd_linf(trained, x, y, eps=0.05, step_size=0.01, steps=2, random_start=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [{"eps": -0.1}, {"step_size": 0.0}, {"steps": -1}, {"restarts": 0}])
def test_bad_settings_are_named(trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor],
                                bad: dict[str, float]) -> None:
    x, y = tiny_batch
    settings = {"eps": 0.1, "step_size": 0.01, "steps": 1, **bad}
    key, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f"{key}={value}"):
        pgd_linf(trained, x, y, **settings)  # type: ignore[arg-type]


def test_cw_margin_loss_is_positive_exactly_when_misclassified() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    margin = cw_margin_loss(logits, y)
    assert margin.tolist() == [-2.0, 2.0]
