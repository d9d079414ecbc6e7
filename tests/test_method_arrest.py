"""ARREST's mechanisms: noisy replay, RGKD, the ablation switches and the representation layer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from pipeline_lib.attacks import pgd_linf, uniform_start
from pipeline_lib.attacks.training import AttackParams
from pipeline_lib.methods import ObjectiveContext, build_objective
from pipeline_lib.methods.arrest import Arrest, ArrestParams
from pipeline_lib.methods.losses import angle, distance
from pipeline_lib.runtime import evaluating

EPS, STEP, STEPS, SEED = 0.1, 0.05, 2, 7


def drifted(model: nn.Module, scale: float = 0.3) -> nn.Module:
    """A frozen copy of `model` with every weight moved by `scale` of its std (seeded):
    its clean representations sit some 25 degrees from the model's, a little differently per example."""
    t = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g) * p.std())
    return t.requires_grad_(False).eval()


def arrest(teacher: nn.Module | None, random_start: bool = True, **params) -> Arrest:
    ctx = ObjectiveContext(attack=AttackParams(eps=EPS, step_size=STEP, steps=STEPS, random_start=random_start),
                           num_classes=10, device=torch.device("cpu"), teacher=teacher, seed=SEED,
                           generator=torch.Generator().manual_seed(SEED))
    obj = build_objective("arrest", params, ctx)
    assert isinstance(obj, Arrest)
    return obj


def clean_angles_deg(model: nn.Module, teacher: nn.Module, x: Tensor) -> Tensor:
    """Reference drift angles (B,), float64 acos of the cosine, both models in eval mode."""
    with torch.no_grad(), evaluating(model):
        a, b = model.forward_features(x).double(), teacher.forward_features(x).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return torch.rad2deg(torch.acos(cos.clamp(-1, 1)))


def split_threshold(angles: Tensor) -> float:
    """A phi between two sorted angles near the median, at the widest gap: some examples
    exceed it, some don't, and none lies within float error of it."""
    s = angles.sort().values
    lo, hi = len(s) // 4, 3 * len(s) // 4
    i = lo + int((s[lo + 1:hi + 1] - s[lo:hi]).argmax())
    return float((s[i] + s[i + 1]) / 2)


def plain_pgd(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
              random_start: bool = False) -> Tensor:
    with evaluating(model):
        return pgd_linf(model, x, y, eps=EPS, step_size=STEP, steps=STEPS, random_start=random_start,
                        generator=generator)


def train_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(h, logits) of a copy of `model` in train mode, as the loop runs the training forward."""
    m = copy.deepcopy(model).train()
    h = m.forward_features(x)
    return h, m.forward_head(h)


# -- noisy replay -------------------------------------------------------------------------------

def test_noisy_replay_switches_exactly_the_examples_beyond_phi(tiny_model, tiny_batch) -> None:
    x, y = tiny_batch
    model, teacher = tiny_model.train(), drifted(tiny_model)
    angles = clean_angles_deg(model, teacher, x)
    phi = split_threshold(angles)
    expect = angles > phi
    assert 0 < int(expect.sum()) < len(x)
    stats_before = {k: v.clone() for k, v in model.state_dict().items()}

    obj = arrest(teacher, random_start=False, phi_deg=phi, rgkd=False)
    x_in, replayed, drift = obj.training_inputs(model, x, y)

    assert torch.equal(replayed, expect)
    assert torch.allclose(drift.double(), angles, atol=1e-3)
    x_adv = plain_pgd(model, x, y)
    assert torch.equal(x_in[~expect], x_adv[~expect]), "non-replayed examples must keep their PGD input"
    noisy, clean = x_in[expect], x[expect]
    assert (noisy - clean).abs().max() <= EPS + 1e-6 and noisy.min() >= 0 and noisy.max() <= 1
    assert (noisy != x_adv[expect]).float().mean() > 0.9, "replayed examples must not keep their PGD input"
    assert (noisy != clean).float().mean() > 0.9
    # The drift is measured in eval mode: no BatchNorm statistic moved, and the mode is as found.
    assert model.training
    assert all(torch.equal(v, stats_before[k]) for k, v in model.state_dict().items())


def test_noise_uses_noise_eps_and_the_objective_generator(tiny_model, tiny_batch) -> None:
    x, y = tiny_batch
    obj = arrest(drifted(tiny_model, 1.0), random_start=False, phi_deg=1e-3, rgkd=False, noise_eps=0.02)
    x_in, replayed, _ = obj.training_inputs(tiny_model, x, y)
    assert replayed.all()
    expected = uniform_start(x, 0.02, torch.Generator().manual_seed(SEED))
    assert torch.equal(x_in, expected)


def test_no_replay_when_the_model_still_is_the_teacher(tiny_model, tiny_batch) -> None:
    """At theta = theta_s the eval-mode drift is exactly 0, even with the model in train
    mode (a train-mode measurement would see batch-statistics noise and replay)."""
    x, y = tiny_batch
    model = tiny_model.train()
    obj = arrest(copy.deepcopy(model).requires_grad_(False).eval(), phi_deg=1e-3)
    x_in, replayed, drift = obj.training_inputs(model, x, y)
    assert not replayed.any()
    assert torch.equal(drift, torch.zeros_like(drift))


def test_replay_rate_is_logged_per_step(tiny_model, tiny_batch) -> None:
    x, y = tiny_batch
    model, teacher = tiny_model.train(), drifted(tiny_model)
    angles = clean_angles_deg(model, teacher, x)
    phi = split_threshold(angles)
    out = arrest(teacher, phi_deg=phi).loss(model, x, y)
    assert out.stats["replay_rate"] == pytest.approx(float((angles > phi).float().mean()))
    assert out.stats["drift_deg"] == pytest.approx(float(angles.mean()), abs=1e-3)
    assert arrest(teacher, phi_deg=180).loss(model, x, y).stats["replay_rate"] == 0.0
    assert arrest(teacher, phi_deg=1e-3).loss(model, x, y).stats["replay_rate"] == 1.0


# -- RGKD ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dist", ["cosine", "angle", "l2"])
def test_rgkd_is_zero_for_the_same_model_on_the_same_input(dist: str, tiny_model, tiny_batch) -> None:
    x, _ = tiny_batch
    teacher = copy.deepcopy(tiny_model).requires_grad_(False).eval()
    obj = arrest(teacher, distance=dist)
    with torch.no_grad(), evaluating(tiny_model):
        h = obj.representation(tiny_model, x)
    assert distance(dist, h, obj.teacher_representation(x)).abs().max() < 1e-6
    # ... and clearly nonzero once the teacher differs (so the check above can fail; l2 is
    # small here only because a fresh model's features are small, ~0.02).
    other = arrest(drifted(tiny_model), distance=dist)
    assert (distance(dist, h, other.teacher_representation(x)) > 1e-5).all()


def test_distances_match_their_definitions() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 5.0], [-1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    assert torch.allclose(angle(a, b), torch.tensor([math.pi / 2, math.pi, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(distance("cosine", a, b), torch.tensor([1.0, 2.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(distance("l2", a, b), torch.tensor([13.0, 2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="same shape"):
        angle(a, b[:2])


# -- ablations: each component is switched by params alone -----------------------------------

def test_aft_only_is_plain_ce_on_pgd_examples_and_never_calls_the_teacher(tiny_model, tiny_batch) -> None:
    x, y = tiny_batch
    model, teacher = tiny_model.train(), drifted(tiny_model)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    x_adv = plain_pgd(model, x, y, torch.Generator().manual_seed(SEED), random_start=True)
    _, logits = train_forward(model, x_adv)
    out = arrest(teacher, rgkd=False, noisy_replay=False, lam=5.0).loss(model, x, y)
    assert torch.allclose(out.loss, F.cross_entropy(logits, y), rtol=1e-5)
    assert not calls
    assert "replay_rate" not in out.stats and "rgkd_dist" not in out.stats
    # Without RGKD and NR the teacher is not needed at all.
    arrest(None, rgkd=False, noisy_replay=False)
    with pytest.raises(ValueError, match="teacher"):
        arrest(None)


@pytest.mark.parametrize("dist", ["cosine", "angle", "l2"])
def test_aft_rgkd_adds_lambda_times_the_distance(dist: str, tiny_model, tiny_batch) -> None:
    x, y = tiny_batch
    model, teacher = tiny_model.train(), drifted(tiny_model)
    x_adv = plain_pgd(model, x, y)
    h, logits = train_forward(model, x_adv)
    with torch.no_grad():
        h_t = teacher.forward_features(x)
    expected = F.cross_entropy(logits, y) + 3.0 * distance(dist, h, h_t).mean()  # type: ignore[arg-type]
    out = arrest(teacher, random_start=False, noisy_replay=False, phi_deg=1e-3, lam=3.0, distance=dist).loss(
        model, x, y)
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    assert "replay_rate" not in out.stats  # NR off although phi would replay everything


def test_aft_nr_ignores_lambda_and_trains_on_the_replayed_inputs(tiny_model, tiny_batch) -> None:
    x, y = tiny_batch
    model, teacher = tiny_model.train(), drifted(tiny_model, 1.0)
    _, logits = train_forward(model, uniform_start(x, EPS, torch.Generator().manual_seed(SEED)))
    for lam in (0.0, 5.0):
        out = arrest(teacher, random_start=False, rgkd=False, phi_deg=1e-3, lam=lam).loss(model, x, y)
        assert out.stats["replay_rate"] == 1.0
        assert torch.allclose(out.loss, F.cross_entropy(logits, y), rtol=1e-5)


def test_full_arrest_combines_replay_and_rgkd(tiny_model, tiny_batch) -> None:
    x, y = tiny_batch
    model, teacher = tiny_model.train(), drifted(tiny_model)
    mask = clean_angles_deg(model, teacher, x) > (phi := split_threshold(clean_angles_deg(model, teacher, x)))
    x_noisy = uniform_start(x, EPS, torch.Generator().manual_seed(SEED))
    x_in = torch.where(mask[:, None, None, None], x_noisy, plain_pgd(model, x, y))
    h, logits = train_forward(model, x_in)
    with torch.no_grad():
        h_t = teacher.forward_features(x)
    expected = F.cross_entropy(logits, y) + 2.0 * (1 - F.cosine_similarity(h, h_t, dim=1)).mean()
    out = arrest(teacher, random_start=False, phi_deg=phi, lam=2.0).loss(model, x, y)
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    assert set(out.stats) == {"ce_adv", "rgkd_dist", "replay_rate", "drift_deg"}


# -- representation layer and params ------------------------------------------------------------

def test_named_layer_is_pooled_and_its_hook_removed(tiny_model, tiny_batch) -> None:
    x, y = tiny_batch
    teacher = drifted(tiny_model)
    obj = arrest(teacher, layer="block2")
    model = obj.prepare_model(tiny_model).eval()
    with torch.no_grad():
        h = obj.representation(model, x)
        ref = model.block2(model.block1(model.normalize(x))).mean(dim=(2, 3))
    assert h.shape == (len(x), 32) and torch.allclose(h, ref)
    assert all(not m._forward_hooks for m in model.modules())
    model.train()
    out = obj.loss(model, x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.block1[0][0].weight.grad is not None
    assert all(not m._forward_hooks for m in list(model.modules()) + list(teacher.modules()))


def test_bad_layers_fail_with_their_name(tiny_model) -> None:
    with pytest.raises(ValueError, match="'block9'"):
        arrest(drifted(tiny_model), layer="block9")

    class Twice(nn.Module):  # a module that runs twice per forward has no single output to distil
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.Tanh()
            self.head = nn.Linear(4, 2)

        def forward_features(self, x: Tensor) -> Tensor:
            return self.act(self.act(x))

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.forward_features(x))

    net = Twice()
    obj = arrest(copy.deepcopy(net).requires_grad_(False), layer="act")
    with pytest.raises(ValueError, match="ran 2 times"):
        obj.representation(net, torch.rand(3, 4))
    assert not net.act._forward_hooks


@pytest.mark.parametrize("bad", [{"phi_deg": 0}, {"phi_deg": 190}, {"lam": -1}, {"distance": "kl"},
                                 {"noise_eps": 0}, {"phi": 30}])
def test_bad_params_are_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ArrestParams.model_validate(bad)
