"""CURE's mechanisms (pipeline_lib/methods/cure.py, rgp.py, revision.py), each checked so it can fail:

* RGP: in every masked layer exactly k = round-half-up(p% * n) gradient entries are zeroed,
  they are the lowest-RGP ones, RGP follows its formula, nothing else is touched; `rgp: false`
  changes no gradient.
* Revision: theta_rev follows the EMA formula when the coin says update and is left untouched
  otherwise; L_CR is zero when the two models are equal; `revision: false` has no revision
  model and no L_CR.
* beta = 0 and gamma = 0 reduce the loss as expected; the exported model is theta; a run
  killed after an epoch and resumed through the shared loop ends identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from pipeline_lib.config import OptimParams
from pipeline_lib.data import BatchLoader
from pipeline_lib.methods import build_objective
from pipeline_lib.methods.cure import CURE
from pipeline_lib.methods.revision import revision_decay
from pipeline_lib.methods.rgp import lowest_mask, masked_count, select_weights
from pipeline_lib.training import fit

SMALL_CNN_MASKED = ["block1.0.0.weight", "block1.1.0.weight", "block2.0.0.weight", "block2.1.0.weight",
                    "fc.weight", "head.weight"]


def make_cure(model: nn.Module, make_ctx: Any, seed: int = 0, **params: Any) -> tuple[CURE, nn.Module]:
    obj = build_objective("cure", params, make_ctx(seed=seed))
    assert isinstance(obj, CURE)
    model = obj.prepare_model(model)
    model.train()
    return obj, model


def kl_batchmean(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(softmax(p) || softmax(q)) averaged over the batch, written independently of the library."""
    return F.kl_div(F.log_softmax(q_logits, 1), F.log_softmax(p_logits, 1), log_target=True, reduction="batchmean")


def expected_rgp(model: nn.Module, make_ctx: Any, x: Tensor, y: Tensor, alpha: float, adv_loss: str,
                 seed: int = 0) -> dict[str, Tensor]:
    """RGP recomputed from scratch on a copy of `model` taken before the step, with the same attack
    noise (a fresh objective on the same seed draws the same N(0, 1) start)."""
    fresh, _ = make_cure(copy.deepcopy(model), make_ctx, seed=seed, rgp=False, revision=False)
    x_adv = fresh.trades_adversarial(model, x, y)
    logits_nat, logits_adv = model(x), model(x_adv)
    l_nat = F.cross_entropy(logits_nat, y)
    l_adv = kl_batchmean(logits_nat, logits_adv) if adv_loss == "kl" else F.cross_entropy(logits_adv, y)
    named = dict(model.named_parameters())
    weights = [named[n] for n in SMALL_CNN_MASKED]
    g_nat = torch.autograd.grad(l_nat, weights, retain_graph=True)
    g_adv = torch.autograd.grad(l_adv, weights)
    return {n: alpha * gn.abs() + (1 - alpha) * ga.abs()
            for n, gn, ga in zip(SMALL_CNN_MASKED, g_nat, g_adv, strict=True)}


# -- RGP -------------------------------------------------------------------------------------------

def test_masked_count_is_round_half_up_of_p_percent() -> None:
    assert masked_count(10, 30) == 3
    assert masked_count(10, 24) == 2          # 2.4 -> 2
    assert masked_count(10, 25) == 3          # 2.5 -> 3 (half up, not banker's rounding)
    assert masked_count(3, 50) == 2           # 1.5 -> 2
    assert masked_count(1, 49) == 0 and masked_count(1, 50) == 1
    assert masked_count(100, 29) == 29        # no float floor trap (0.29 * 100 = 28.999...)
    assert masked_count(7, 0) == 0 and masked_count(0, 30) == 0
    with pytest.raises(ValueError, match="p=101"):
        masked_count(10, 101)


def test_lowest_mask_breaks_ties_by_index() -> None:
    score = torch.tensor([[0.5, 0.1, 0.1], [0.1, 0.9, 0.0]])
    assert lowest_mask(score, 3).tolist() == [[False, True, True], [False, False, True]]
    assert not lowest_mask(score, 0).any()


def test_rgp_selects_conv_and_linear_weights(tiny_model) -> None:
    assert select_weights(tiny_model, "conv_linear") == SMALL_CNN_MASKED
    assert select_weights(tiny_model, "conv") == SMALL_CNN_MASKED[:4]
    assert select_weights(tiny_model, "conv_linear", ["head.*"]) == SMALL_CNN_MASKED[:5]
    with pytest.raises(ValueError, match="'haed.*'"):
        select_weights(tiny_model, "conv_linear", ["haed.*"])


@pytest.mark.parametrize(("p", "alpha", "adv_loss"), [(30.0, 0.1, "kl"), (45.0, 0.0, "ce"), (12.5, 1.0, "kl")])
def test_rgp_zeroes_exactly_the_p_percent_lowest_rgp_gradients(p: float, alpha: float, adv_loss: str,
                                                              tiny_model, tiny_batch, make_ctx) -> None:
    x, y = tiny_batch
    before_step = copy.deepcopy(tiny_model).train()
    obj, model = make_cure(tiny_model, make_ctx, p=p, alpha=alpha, rgp_adv_loss=adv_loss, revision=False)
    assert obj.rgp_names == SMALL_CNN_MASKED

    obj.loss(model, x, y).loss.backward()
    scores = obj.rgp_scores
    assert scores is not None and list(scores) == SMALL_CNN_MASKED
    # RGP follows alpha |dCE(x)/dw| + (1 - alpha) |dL(x_adv)/dw|, recomputed independently
    want = expected_rgp(before_step, make_ctx, x, y, alpha, adv_loss)
    for n in SMALL_CNN_MASKED:
        torch.testing.assert_close(scores[n], want[n], rtol=1e-4, atol=1e-7)

    grads = {n: prm.grad.clone() for n, prm in model.named_parameters()}
    obj.before_optimizer_step(model)
    for n, prm in model.named_parameters():
        if n not in SMALL_CNN_MASKED:
            assert torch.equal(prm.grad, grads[n]), f"{n} is not masked but its gradient changed"
            continue
        k = masked_count(prm.numel(), p)
        assert 0 < k < prm.numel()
        lowest = torch.zeros(prm.numel(), dtype=torch.bool)
        lowest[torch.argsort(scores[n].flatten(), stable=True)[:k]] = True
        lowest = lowest.view(prm.shape)
        assert int(lowest.sum()) == k
        # exactly the k lowest-RGP entries are zeroed, every other entry is untouched
        assert torch.equal(prm.grad, grads[n].masked_fill(lowest, 0.0)), f"{n}: wrong entries zeroed"
        # and, by the independent RGP, nothing kept ranks below anything zeroed (up to float noise)
        assert want[n][lowest].max() <= want[n][~lowest].min() * (1 + 1e-4) + 1e-9
    assert obj.rgp_scores is None  # consumed: a stale RGP can never mask the next step


def test_rgp_off_changes_no_gradient(tiny_model, tiny_batch, make_ctx) -> None:
    x, y = tiny_batch
    obj, model = make_cure(tiny_model, make_ctx, rgp=False, revision=False)
    assert obj.rgp_names == []
    obj.loss(model, x, y).loss.backward()
    assert obj.rgp_scores is None
    grads = {n: prm.grad.clone() for n, prm in model.named_parameters()}
    obj.before_optimizer_step(model)
    assert all(torch.equal(prm.grad, grads[n]) for n, prm in model.named_parameters())


def test_mask_step_without_loss_is_an_error(tiny_model, make_ctx) -> None:
    obj, model = make_cure(tiny_model, make_ctx, revision=False)
    with pytest.raises(RuntimeError, match="without a preceding loss"):
        obj.before_optimizer_step(model)
    unprepared = build_objective("cure", {}, make_ctx())
    with pytest.raises(RuntimeError, match="prepare_model"):
        unprepared.loss(model, torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))


# -- revision model and consistency loss ----------------------------------------------------------

def test_revision_follows_the_ema_when_drawn_and_is_untouched_otherwise(tiny_model, make_ctx) -> None:
    d_cap = 0.99
    obj, model = make_cure(tiny_model, make_ctx, rgp=False, r=0.5, d=d_cap)
    rev = obj.revision
    assert rev is not None and rev.module is not model
    assert not any(prm.requires_grad for prm in rev.module.parameters())
    assert not list(obj.extra_modules().parameters())  # theta_rev is never handed to the optimizer
    g = torch.Generator().manual_seed(1)
    outcomes = []
    for step_no in [*range(1, 13), *range(500, 512)]:  # d still rising, then capped at d_cap
        with torch.no_grad():  # stands in for an optimizer step
            for prm in model.parameters():
                prm.add_(torch.randn(prm.shape, generator=g))
        old_params = [q.detach().clone() for q in rev.module.parameters()]
        old_buffers = [b.clone() for b in rev.module.buffers()]
        coin = torch.Generator()
        coin.set_state(rev.generator.get_state())
        drawn = torch.rand((), generator=coin).item() < 0.5   # the draw the hook is about to make
        obj.after_optimizer_step(model, step_no)
        d = min(1 - 1 / (step_no + 1), d_cap)
        assert revision_decay(step_no, d_cap) == d
        for q_rev, q_old, q in zip(rev.module.parameters(), old_params, model.parameters(), strict=True):
            if drawn:
                torch.testing.assert_close(q_rev, d * q_old + (1 - d) * q.detach(), rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(q_rev, q_old)
        assert all(torch.equal(b, o) for b, o in zip(rev.module.buffers(), old_buffers, strict=True)), \
            "the EMA must not touch buffers"
        outcomes.append(drawn)
    assert any(outcomes) and not all(outcomes)
    stats = obj.on_epoch_end(model, 0)
    assert stats["revision_update_rate"] == sum(outcomes) / len(outcomes)


def test_consistency_loss_is_zero_when_the_models_are_equal(tiny_model, tiny_batch, make_ctx) -> None:
    x, y = tiny_batch
    obj, model = make_cure(tiny_model, make_ctx, rgp=False, beta=2.0, gamma=0.5)
    rev_modes = [m.training for m in obj.revision.module.modules()]
    out = obj.loss(model, x, y)
    assert float(out.stats["loss_cr"]) == 0.0       # theta_rev is a copy of theta: same outputs
    assert [m.training for m in obj.revision.module.modules()] == rev_modes
    torch.testing.assert_close(out.loss, out.stats["ce_nat"] + 2.0 * out.stats["kl"])

    with torch.no_grad():  # theta moves away from theta_rev: L_CR becomes positive and enters the loss
        for prm in model.parameters():
            prm.mul_(1.1)
    out = obj.loss(model, x, y)
    assert float(out.stats["loss_cr"]) > 1e-4
    torch.testing.assert_close(out.loss, out.stats["ce_nat"] + 2.0 * out.stats["kl"]
                               + 0.5 * out.stats["loss_cr"])


def test_revision_off_has_no_revision_model_and_no_consistency_loss(tiny_model, tiny_batch, make_ctx) -> None:
    x, y = tiny_batch
    before_step = copy.deepcopy(tiny_model).train()
    obj, model = make_cure(tiny_model, make_ctx, rgp=False, revision=False, beta=3.0)
    assert obj.revision is None and obj.state_dict() == {}
    out = obj.loss(model, x, y)
    assert "loss_cr" not in out.stats
    fresh, _ = make_cure(copy.deepcopy(before_step), make_ctx, rgp=False, revision=False)
    x_adv = fresh.trades_adversarial(before_step, x, y)
    logits_nat = before_step(x)
    want = F.cross_entropy(logits_nat, y) + 3.0 * kl_batchmean(logits_nat, before_step(x_adv))
    torch.testing.assert_close(out.loss, want)
    obj.after_optimizer_step(model, 1)  # nothing to revise, no error
    assert "revision_update_rate" not in obj.on_epoch_end(model, 0)


def test_beta_zero_leaves_clean_cross_entropy(tiny_model, tiny_batch, make_ctx) -> None:
    x, y = tiny_batch
    obj, model = make_cure(tiny_model, make_ctx, rgp=False, revision=False, beta=0.0)
    out = obj.loss(model, x, y)
    assert float(out.stats["kl"]) > 0          # the KL is there, only its weight is 0
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))


def test_gamma_zero_gives_the_loss_without_revision(tiny_model, tiny_batch, make_ctx) -> None:
    x, y = tiny_batch
    with torch.no_grad():  # make L_CR non-zero so gamma = 0 has something to remove
        obj, model = make_cure(copy.deepcopy(tiny_model), make_ctx, rgp=False, gamma=0.0)
        for prm in model.parameters():
            prm.mul_(1.1)
    plain, plain_model = make_cure(copy.deepcopy(model), make_ctx, rgp=False, revision=False)
    out, ref = obj.loss(model, x, y), plain.loss(plain_model, x, y)
    assert float(out.stats["loss_cr"]) > 1e-4
    assert torch.equal(out.loss, ref.loss)


def test_exported_model_is_theta_not_the_revision(tiny_model, tiny_batch, make_ctx) -> None:
    x, y = tiny_batch
    obj, model = make_cure(tiny_model, make_ctx, rgp=False, r=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step_no in (1, 2):
        opt.zero_grad()
        obj.loss(model, x, y).loss.backward()
        obj.before_optimizer_step(model)
        opt.step()
        obj.after_optimizer_step(model, step_no)
    exported = obj.export_model(model)
    assert exported is model
    rev = dict(obj.revision.module.named_parameters())
    assert any(not torch.equal(prm, rev[n]) for n, prm in exported.named_parameters())


# -- params and resume -----------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value"), [("p", 100), ("alpha", 1.5), ("r", -0.1), ("d", 1.2), ("beta", -1),
                                            ("gamma", -1), ("rgp_layers", "bn"), ("rgp_adv_loss", "mse"),
                                            ("rgp_variant", "soft")])
def test_bad_params_are_rejected_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=rf"(?m)^{key}$"):  # pydantic puts the key on its own line
        CURE.Params.model_validate({key: value})


def test_killed_and_resumed_run_ends_identical(tiny_batch, fmnist_spec, make_ctx, tmp_path) -> None:
    """Through the shared loop: 2 epochs straight vs 1 epoch, 'kill', resume from the state file."""
    from pipeline_lib.models import build_model

    x, y = tiny_batch
    images = (x * 255).round().to(torch.uint8)
    optim = OptimParams(epochs=2, batch_size=16, lr=0.05, schedule="constant")

    def run(state_path: Any, stop_after: int | None = None) -> tuple[nn.Module, CURE]:
        torch.manual_seed(0)
        obj, model = make_cure(build_model("small_cnn", fmnist_spec), make_ctx, r=0.5)
        loader = BatchLoader(images, y, 16, shuffle=True, drop_last=True, seed=0)
        val = BatchLoader(images, y, 32)

        def on_epoch(rec: dict[str, float]) -> None:
            if stop_after is not None and rec["epoch"] == stop_after:
                raise KeyboardInterrupt  # killed right after the epoch's state was saved

        try:
            fit(model, obj, loader, val, optim, seed=0, state_path=state_path, progress=False, on_epoch=on_epoch)
        except KeyboardInterrupt:
            pass
        return model, obj

    straight, obj_a = run(None)
    state = tmp_path / "state.pt"
    run(state, stop_after=1)
    resumed, obj_b = run(state)
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"model {n} differs after resume"
    rev_a, rev_b = obj_a.revision.state_dict(), obj_b.revision.state_dict()
    assert all(torch.equal(v, rev_b["module"][k]) for k, v in rev_a["module"].items())
    assert torch.equal(rev_a["rng"], rev_b["rng"])


# -- RGP, official variant (rgp_soft) ---------------------------------------------------------------

class ConvOneNet(nn.Module):
    """A tiny residual-style net with the official code's parameter names: a stem `conv1`, one block
    with `conv1` / `conv2`, a linear head. Only `layer1.0.conv1.weight` is masked by the official rule."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(nn.Module())
        self.layer1[0].conv1 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.layer1[0].bn1 = nn.BatchNorm2d(6)
        self.layer1[0].conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: Tensor) -> Tensor:
        b = self.layer1[0]
        h = F.relu(self.bn1(self.conv1(x)))
        h = b.conv2(F.relu(b.bn1(b.conv1(h))))
        return self.fc(h.mean((2, 3)))


def official_rgp_soft(model: nn.Module, loss_nat: Tensor, loss_rob: Tensor, loss: Tensor, w_nat: float,
                      w_rob: float, percentile: float) -> dict[str, Tensor]:
    """Copy of the official formula (NeurAI-Lab/CURE, RGP.acc_grads + RGP.fuse_grads), written here:
    per parameter in order, grad_rgp = w_nat * g_nat + w_rob * g_rob (signed); for index l > 0 whose
    name contains 'conv1', the total-loss gradient is zeroed where grad_rgp < np.percentile(grad_rgp, p)."""
    import numpy as np

    names, params = zip(*model.named_parameters(), strict=True)

    def grads(of: Tensor) -> list[Tensor]:
        gs = torch.autograd.grad(of, params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.clone() for p, g in zip(params, gs, strict=True)]

    g_nat, g_rob, g_loss = grads(loss_nat), grads(loss_rob), grads(loss)
    out = {}
    for layer, name in enumerate(names):
        rgp = g_nat[layer] * w_nat + g_rob[layer] * w_rob
        g = g_loss[layer]
        if layer > 0 and "conv1" in name:
            g[rgp < float(np.percentile(rgp.numpy(), percentile))] = 0.0
        out[name] = g
    return out


def test_official_rgp_selects_the_block_conv1_weights_not_the_stem(fmnist_spec) -> None:
    from pipeline_lib.data import get_spec
    from pipeline_lib.models import build_model

    assert select_weights(ConvOneNet(), "conv1") == ["layer1.0.conv1.weight"]
    names = select_weights(build_model("resnet18", get_spec("cifar10")), "conv1")
    assert names == [f"layer{s}.{b}.conv1.weight" for s in range(1, 5) for b in range(2)]
    with pytest.raises(ValueError, match="selects no weights"):
        select_weights(build_model("small_cnn", fmnist_spec), "conv1")   # no 'conv1' names at all


@pytest.mark.parametrize(("p", "alpha", "revision"), [(30.0, 0.1, False), (50.0, 0.3, True)])
def test_official_rgp_matches_the_official_formula_on_a_fixed_batch(p: float, alpha: float, revision: bool,
                                                                     tiny_batch, make_ctx) -> None:
    x, y = (t[:16] for t in tiny_batch)
    x = x.double()
    torch.manual_seed(0)
    model = ConvOneNet().double().train()
    reference = copy.deepcopy(model)
    obj, model = make_cure(model, make_ctx, rgp_variant="official", p=p, alpha=alpha, beta=5.0, revision=revision)
    assert obj.rgp_names == ["layer1.0.conv1.weight"]
    obj.loss(model, x, y).loss.backward()
    obj.before_optimizer_step(model)

    # the same step recomputed by the official formula on a copy taken before it (same attack noise)
    fresh, _ = make_cure(copy.deepcopy(reference), make_ctx, rgp=False, revision=False)
    x_adv = fresh.trades_adversarial(reference, x, y)
    logits_nat, logits_adv = reference(x), reference(x_adv)
    loss_nat = F.cross_entropy(logits_nat, y)
    loss_rob = kl_batchmean(logits_nat, logits_adv)
    loss = loss_nat + 5.0 * loss_rob              # theta_rev == theta at step 0, so L_CR's gradient is 0
    want = official_rgp_soft(reference, loss_nat, loss_rob, loss, alpha, 1 - alpha, p)
    for name, prm in model.named_parameters():
        torch.testing.assert_close(prm.grad, want[name], rtol=1e-9, atol=1e-12, msg=name)
    masked = model.layer1[0].conv1.weight.grad
    zeroed = int((masked == 0).sum())
    assert 0 < zeroed <= round(p / 100 * masked.numel())   # strictly below the percentile
    # and it is a different mask from the paper variant's on the same step
    paper, pmodel = make_cure(copy.deepcopy(reference), make_ctx, p=p, alpha=alpha, beta=5.0, revision=False,
                              rgp_layers="conv1")
    paper.loss(pmodel, x, y).loss.backward()
    paper.before_optimizer_step(pmodel)
    assert not torch.equal(pmodel.layer1[0].conv1.weight.grad == 0, masked == 0)
