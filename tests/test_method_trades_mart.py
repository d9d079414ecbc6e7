"""TRADES and MART: their losses against hand computations and their attacks against the spec."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from pipeline_lib.attacks import pgd_linf
from pipeline_lib.attacks.training import AttackParams
from pipeline_lib.methods import ObjectiveContext, build_objective
from pipeline_lib.methods.losses import kl_per_example
from pipeline_lib.methods.mart import MartParams, mart_loss_from_logits
from pipeline_lib.methods.trades import TradesParams
from pipeline_lib.runtime import evaluating

EPS, STEP, STEPS, SEED = 0.1, 0.05, 3, 5


def objective(name: str, **params):
    ctx = ObjectiveContext(attack=AttackParams(eps=EPS, step_size=STEP, steps=STEPS), num_classes=10,
                           device=torch.device("cpu"), seed=SEED, generator=torch.Generator().manual_seed(SEED))
    return build_objective(name, params, ctx)


def official_start(x: Tensor) -> Tensor:
    """x + 0.001 N(0, 1) drawn from a generator seeded like the objective's."""
    return x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(SEED))


def reference_attack(model: nn.Module, x: Tensor, y: Tensor, kind: str) -> Tensor:
    """The TRADES (KL to the fixed p(x)) or MART (CE) attack from the official start, in eval mode."""
    with evaluating(model):
        with torch.no_grad():
            ref = model(x)
        loss_fn = (lambda logits, _y: kl_per_example(ref, logits)) if kind == "trades" else None
        kw = {"loss_fn": loss_fn} if loss_fn else {}
        return pgd_linf(model, x, y, eps=EPS, step_size=STEP, steps=STEPS, x_init=official_start(x), **kw)


def train_logits(model: nn.Module, *inputs: Tensor) -> list[Tensor]:
    """Logits of a train-mode copy of `model`, one forward per input (as the objectives do)."""
    m = copy.deepcopy(model).train()
    return [m(t) for t in inputs]


# -- KL -----------------------------------------------------------------------------------------

def test_kl_matches_a_hand_computation_and_is_zero_for_identical_distributions() -> None:
    p_logits = torch.tensor([[0.0, math.log(3.0)], [1.0, -2.0]])
    q_logits = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    kl = kl_per_example(p_logits, q_logits)
    # p = (1/4, 3/4), q = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2)
    assert kl[0].item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    random = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(kl_per_example(random, random), torch.zeros(64), atol=1e-6)
    assert (kl_per_example(random, random.flip(0)) >= 0).all()


def test_kl_keeps_gradients_on_both_sides() -> None:
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    kl_per_example(a, b).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad is not None and b.grad.abs().sum() > 0


# -- TRADES -------------------------------------------------------------------------------------

def test_trades_with_beta_zero_is_clean_ce(tiny_model, tiny_batch) -> None:
    x, y = tiny_batch
    model = tiny_model.train()
    (logits,) = train_logits(model, x)
    out = objective("trades", beta=0.0).loss(model, x, y)
    assert torch.allclose(out.loss, F.cross_entropy(logits, y), rtol=1e-6)


def test_trades_loss_is_ce_plus_beta_batchmean_kl_on_the_kl_attack(tiny_model, tiny_batch) -> None:
    x, y = tiny_batch
    model = tiny_model.train()
    x_adv = reference_attack(model, x, y, "trades")
    nat, adv = train_logits(model, x, x_adv)
    kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="batchmean")  # the official form
    out = objective("trades", beta=6.0).loss(model, x, y)
    assert kl > 0
    assert torch.allclose(out.loss, F.cross_entropy(nat, y) + 6.0 * kl, rtol=1e-5)
    assert out.stats["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert model.training


def test_trades_attack_raises_the_kl_from_its_start(tiny_model, tiny_batch) -> None:
    x, y = tiny_batch
    obj = objective("trades")
    x_adv = obj.trades_adversarial(tiny_model, x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    with torch.no_grad(), evaluating(tiny_model):
        ref = tiny_model(x)
        kl_start = kl_per_example(ref, tiny_model(official_start(x).clamp(0, 1))).mean()
        kl_adv = kl_per_example(ref, tiny_model(x_adv)).mean()
    assert kl_adv > 10 * kl_start


# -- MART ---------------------------------------------------------------------------------------

def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("beta", [0.0, 6.0])
def test_mart_matches_a_hand_computation(beta: float) -> None:
    nat = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
    adv = [[0.5, 1.0, 0.0], [0.0, 1.0, 2.0]]
    y = [0, 2]
    # Example 0: adversarial top class 1 != y, so the boosted class is 1.
    # Example 1: adversarial top class 2 == y, so the boosted class is the runner-up, 1.
    wrong = [1, 1]
    bce = kl_w = 0.0
    for pn_row, pa_row, yi, wi in zip(map(_softmax, nat), map(_softmax, adv), y, wrong, strict=True):
        bce += -math.log(pa_row[yi]) - math.log(1.0001 - pa_row[wi] + 1e-12)
        kl = sum(pn * (math.log(pn) - math.log(pa)) for pn, pa in zip(pn_row, pa_row, strict=True))
        kl_w += kl * (1.0000001 - pn_row[yi])
    expected = bce / 2 + beta * kl_w / 2

    loss, bce_t, kl_t = mart_loss_from_logits(torch.tensor(nat), torch.tensor(adv), torch.tensor(y), beta)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert bce_t.item() == pytest.approx(bce / 2, rel=1e-5)
    assert kl_t.item() == pytest.approx(kl_w / 2, rel=1e-5)


def test_mart_loss_is_applied_to_the_ce_attack(tiny_model, tiny_batch) -> None:
    x, y = tiny_batch
    model = tiny_model.train()
    x_adv = reference_attack(model, x, y, "mart")
    nat, adv = train_logits(model, x, x_adv)
    expected, _, _ = mart_loss_from_logits(nat, adv, y, 6.0)
    out = objective("mart").loss(model, x, y)
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    assert out.logits is not None and torch.allclose(out.logits, adv, atol=1e-5)


@pytest.mark.parametrize("cls", [TradesParams, MartParams])
@pytest.mark.parametrize("bad", [{"beta": -1.0}, {"init_std": -0.1}, {"lambda": 1.0}, {"clamp_start": "maybe"}])
def test_bad_params_are_rejected(cls, bad: dict) -> None:
    with pytest.raises(ValidationError):
        cls.model_validate(bad)


# -- official details: unprojected start, TRADES' three forwards ----------------------------------

class Recorder(nn.Module):
    """Wraps a model and keeps a copy of every input it is called with."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def edge_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The tiny batch with black and white pixels, where x + 0.001 N(0, 1) leaves [0, 1]."""
    x, y = batch
    x = x.clone()
    x[:, :, :4] = 0.0
    x[:, :, -4:] = 1.0
    return x, y


@pytest.mark.parametrize(("name", "first_attack_forward"), [("trades", 1), ("mart", 0), ("cure", 1)])
@pytest.mark.parametrize("clamp_start", [True, False])
def test_the_attack_start_is_unprojected_only_with_clamp_start_false(name: str, first_attack_forward: int,
                                                                      clamp_start: bool, tiny_model,
                                                                      tiny_batch) -> None:
    x, y = edge_batch(tiny_batch)
    model = Recorder(tiny_model).train()
    obj = objective(name, clamp_start=clamp_start, **({"revision": False, "rgp": False} if name == "cure" else {}))
    if name == "cure":
        obj.prepare_model(model)
    obj.loss(model, x, y)
    start = official_start(x)
    assert start.min() < 0 and start.max() > 1          # the planted failure: the start leaves [0, 1]
    seen = model.inputs[first_attack_forward]
    want = start.clamp(0, 1) if clamp_start else start   # (within the ball anyway: 0.001 << eps)
    assert torch.equal(seen, want)
    assert all(t.min() >= 0 and t.max() <= 1 for t in model.inputs[first_attack_forward + 1:])


def official_trades_loss(model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, beta: float) -> Tensor:
    """Copy of the official formula (yaodongyu/TRADES `trades_loss`, l_inf), written here: eval-mode KL
    attack from the unclamped x + 0.001 N(0, 1), then three train-mode forwards (clean, adv, clean)."""
    model.eval()
    x_adv = x.detach() + 0.001 * noise
    for _ in range(STEPS):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="sum")
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + STEP * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
    model.train()
    x_adv = x_adv.clamp(0.0, 1.0)
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / len(x)) * F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1),
                                            reduction="sum")
    return loss_natural + beta * loss_robust


def bn_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {n: b for n, b in model.named_buffers() if "running" in n}


def test_trades_official_options_match_the_official_loss_and_bn_statistics(tiny_model, tiny_batch) -> None:
    x, y = edge_batch(tiny_batch)
    x, model = x.double(), tiny_model.double().train()
    official = copy.deepcopy(model)
    two = copy.deepcopy(model)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    want = official_trades_loss(official, x, y, noise, beta=6.0)
    got = objective("trades", beta=6.0, clamp_start=False, three_forwards=True).loss(model, x, y).loss
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    want.backward()
    for (n, a), b in zip(model.named_parameters(), official.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12, msg=n)
    ref = bn_buffers(official)
    for n, b in bn_buffers(model).items():
        torch.testing.assert_close(b, ref[n], rtol=1e-10, atol=1e-12, msg=n)
    # two forwards (the project default) move the running statistics differently: same loss value
    got_two = objective("trades", beta=6.0, clamp_start=False).loss(two, x, y).loss
    torch.testing.assert_close(got_two, want, rtol=1e-10, atol=1e-12)
    gap = max(float((b - ref[n]).abs().max()) for n, b in bn_buffers(two).items())
    assert gap > 1e-3
