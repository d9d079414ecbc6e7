"""AR-AT: split-BN surgery, the asymmetric invariance loss, auto-balance, predictors, SWA export."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from pipeline_lib.config import OptimParams
from pipeline_lib.data import BatchLoader, get_spec
from pipeline_lib.methods import build_objective
from pipeline_lib.methods.arat import ARATParams
from pipeline_lib.methods.split_bn import (
    SplitBatchNorm,
    batchnorm_names,
    bn_branch,
    merge_branch,
    set_branch,
    split_batchnorm,
    split_modules,
)
from pipeline_lib.models import MODELS, build_model
from pipeline_lib.training.loop import fit


def prepared(model: nn.Module, make_ctx, **params):
    obj = build_objective("arat", params, make_ctx())
    return obj, obj.prepare_model(model)


class GlobalRngLoader:
    """Batches in an order drawn from the *global* torch RNG at each iteration (like a DataLoader)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self):
        order = torch.randperm(len(self.y))
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]


def loader_of(batch, batch_size: int = 8, seed: int = 0) -> BatchLoader:
    x, y = batch
    return BatchLoader((x * 255).round().to(torch.uint8), y, batch_size, shuffle=True, seed=seed)


def sgd_steps(obj, model: nn.Module, x, y, n: int, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(list(model.parameters()) + list(obj.extra_modules().parameters()), lr=lr)
    model.train()
    for step in range(1, n + 1):
        opt.zero_grad()
        obj.loss(model, x, y).loss.backward()
        opt.step()
        obj.after_optimizer_step(model, step)


def fit_standard(model: nn.Module, x, y, steps: int = 40) -> None:
    """A few plain SGD steps so the tiny model classifies the tiny batch (accuracies become informative)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# -- surgery ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", MODELS.names())
def test_surgery_on_every_registered_model_keeps_weights_shared(arch):
    spec = get_spec("fashion_mnist" if arch == "small_cnn" else "cifar10")
    torch.manual_seed(0)
    model = build_model(arch, spec)
    original = copy.deepcopy(model.state_dict())
    bn_names = batchnorm_names(model)
    bn_params = sum(p.numel() for n in bn_names for p in model.get_submodule(n).parameters())
    n_params = sum(p.numel() for p in model.parameters())
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    assert split_batchnorm(model) == bn_names and len(bn_names) > 0
    assert split_batchnorm(model) == []                      # idempotent
    assert batchnorm_names(model) == []                      # no BN left outside a pair (shortcut BNs too)
    assert [n for n, m in model.named_modules() if isinstance(m, SplitBatchNorm)] == bn_names
    # conv/linear weights are the very same tensors; only the BN affine parameters are doubled
    assert all(model.get_submodule(n).weight is w for n, w in weights.items())
    assert sum(p.numel() for p in model.parameters()) == n_params + bn_params
    # merging a branch back gives the original architecture and values
    merged = merge_branch(model, "adv").state_dict()
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)


def test_split_needs_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm"):
        split_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_branch_switching_is_model_wide_and_restored(tiny_model):
    split_batchnorm(tiny_model)
    assert {m.branch for m in split_modules(tiny_model)} == {"adv"}   # test-time branch by default
    with bn_branch(tiny_model, "clean"):
        assert {m.branch for m in split_modules(tiny_model)} == {"clean"}
    assert {m.branch for m in split_modules(tiny_model)} == {"adv"}
    set_branch(tiny_model, "clean")
    assert {m.branch for m in split_modules(tiny_model)} == {"clean"}
    with pytest.raises(ValueError, match="'dirty'"):
        with bn_branch(tiny_model, "dirty"):  # type: ignore[arg-type]
            pass


def test_generic_model_with_batchnorm_and_named_layers(make_ctx, tiny_batch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 10))
    with pytest.raises(ValueError, match="Sequential"):     # no default layers for an unknown architecture
        prepared(copy.deepcopy(net), make_ctx)
    obj, model = prepared(net, make_ctx, layers=["1"], gamma=2.0)
    out = obj.loss(model.train(), *tiny_batch)
    assert torch.isfinite(out.loss) and len(obj.extra_modules()["predictors"]) == 1


# -- split BN in training and at test time -----------------------------------------------------------
def test_split_bn_statistics_diverge_and_evaluation_uses_adv_bn(tiny_model, make_ctx, tiny_batch):
    x, y = tiny_batch
    obj, model = prepared(tiny_model, make_ctx)
    splits = split_modules(model)
    assert all(torch.equal(s.clean.running_mean, s.adv.running_mean) for s in splits)
    sgd_steps(obj, model, x, y, n=2)
    # the clean BN only saw x, the adversarial BN only x_adv: every pair's statistics differ now
    assert all(not torch.allclose(s.clean.running_mean, s.adv.running_mean) for s in splits)
    assert all(not torch.allclose(s.clean.running_var, s.adv.running_var) for s in splits)

    exported = obj.export_model(model)
    assert not split_modules(exported) and type(exported) is type(tiny_model)
    build_model("small_cnn", get_spec("fashion_mnist")).load_state_dict(exported.state_dict())  # strict
    model.eval()
    exported.eval()
    with torch.no_grad():
        with bn_branch(model, "adv"):
            adv_out = model(x)
        with bn_branch(model, "clean"):
            clean_out = model(x)
        out = exported(x)
    assert torch.equal(out, adv_out)
    assert not torch.allclose(out, clean_out)


def test_attack_runs_through_the_adv_bn_in_train_mode(tiny_model, make_ctx, tiny_batch):
    # the context asks for an eval-mode attack: AR-AT overrides it (train mode, adversarial BN)
    obj = build_objective("arat", {}, make_ctx(steps=3, bn_mode="eval"))
    model = obj.prepare_model(tiny_model).train()
    obj.loss(model, *tiny_batch)
    for s in split_modules(model):
        assert int(s.clean.num_batches_tracked) == 1        # the clean forward only
        assert int(s.adv.num_batches_tracked) == 3 + 1      # 3 attack steps in train mode + the adv forward


def test_shared_bn_ablation_keeps_plain_batchnorm(tiny_model, make_ctx, tiny_batch):
    obj, model = prepared(tiny_model, make_ctx, split_bn=False)
    assert not split_modules(model)
    sgd_steps(obj, model, *tiny_batch, n=1)
    assert obj.export_model(model) is model


# -- the invariance term -----------------------------------------------------------------------------
@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient_blocks_the_clean_branch(tiny_model, make_ctx, tiny_batch, stop_gradient):
    obj, model = prepared(tiny_model, make_ctx, stop_gradient=stop_gradient)
    inv = obj.loss_terms(model.train(), *tiny_batch)["invariance"]
    clean = [p for s in split_modules(model) for p in s.clean.parameters()]
    adv = [p for s in split_modules(model) for p in s.adv.parameters()]
    grads = torch.autograd.grad(inv, clean + adv, allow_unused=True)
    norm = [0.0 if g is None else float(g.abs().sum()) for g in grads]
    clean_norm, adv_norm = sum(norm[:len(clean)]), sum(norm[len(clean):])
    assert adv_norm > 0                         # the term does train the adversarial branch
    if stop_gradient:
        assert clean_norm == 0.0                # asymmetric: nothing reaches the clean BN
    else:
        assert clean_norm > 0                   # symmetric ablation: the clean branch moves too


def test_one_predictor_per_layer_and_none_when_disabled(tiny_model, make_ctx, tiny_batch):
    obj, model = prepared(copy.deepcopy(tiny_model), make_ctx)
    predictors = obj.extra_modules()["predictors"]
    assert len(predictors) == len(obj.layers) == 3
    inv = obj.loss_terms(model.train(), *tiny_batch)["invariance"]
    grads = torch.autograd.grad(inv, list(predictors.parameters()), allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # each predictor is trained

    obj, model = prepared(copy.deepcopy(tiny_model), make_ctx, layers=["block1.0.1", "fc_bn"])
    assert [p[0].in_features for p in obj.extra_modules()["predictors"]] == [16, 64]  # sized per layer

    obj, model = prepared(copy.deepcopy(tiny_model), make_ctx, predictor=False)
    assert len(list(obj.extra_modules().parameters())) == 0
    assert torch.isfinite(obj.loss(model.train(), *tiny_batch).loss)


def test_bad_layer_name_is_a_clear_error_before_any_surgery(tiny_model, make_ctx):
    obj = build_objective("arat", {"layers": ["block2.0.1", "block9.bn"]}, make_ctx())
    with pytest.raises(ValueError, match="block9.bn"):
        obj.prepare_model(tiny_model)
    assert not split_modules(tiny_model)
    with pytest.raises(ValidationError, match="duplicate"):
        ARATParams(layers=["fc_bn", "fc_bn"])


# -- auto-balance ------------------------------------------------------------------------------------
def test_auto_balance_weights_equal_measured_clean_accuracy(tiny_model, make_ctx, tiny_batch):
    x, y = tiny_batch
    fit_standard(tiny_model, x, y)
    obj, model = prepared(tiny_model, make_ctx, balance_images=20)
    for s in split_modules(model):     # break the adv branch only: the two branches' accuracies differ
        nn.init.zeros_(s.adv.weight)
    loader = GlobalRngLoader(x, y, batch_size=8)
    model.train()
    rng = torch.get_rng_state()
    record = obj.on_epoch_start(model, 0, loader)
    assert torch.equal(torch.get_rng_state(), rng)   # measuring did not move the epoch's randomness...
    batches = list(loader)                            # ...so these are the batches that were measured
    xs, ys = torch.cat([b[0] for b in batches])[:20], torch.cat([b[1] for b in batches])[:20]
    with torch.no_grad():
        expected = float((merge_branch(model, "clean").eval()(xs).argmax(1) == ys).float().mean())
        adv_acc = float((merge_branch(model, "adv").eval()(xs).argmax(1) == ys).float().mean())
    assert expected != adv_acc
    assert record["balance_clean_acc"] == pytest.approx(expected)
    assert model.training and {s.branch for s in split_modules(model)} == {"adv"}   # mode and branch restored

    out = obj.loss(model, x, y)
    assert out.stats["w_adv"] == pytest.approx(expected)
    expected_total = expected * out.stats["ce_adv"] + (1 - expected) * out.stats["ce_clean"] + out.stats["invariance"]
    assert float(out.loss.detach()) == pytest.approx(float(expected_total), rel=1e-5)


def test_fixed_ce_weights(tiny_model, make_ctx, tiny_batch):
    obj, model = prepared(tiny_model, make_ctx, auto_balance=False, adv_weight=0.7, clean_weight=0.2)
    assert obj.on_epoch_start(model, 0, loader_of(tiny_batch)) == {}
    out = obj.loss(model.train(), *tiny_batch)
    total = 0.7 * out.stats["ce_adv"] + 0.2 * out.stats["ce_clean"] + out.stats["invariance"]
    assert float(out.loss.detach()) == pytest.approx(float(total), rel=1e-5)
    with pytest.raises(ValidationError, match="auto_balance"):
        ARATParams(adv_weight=0.5)


# -- SWA ---------------------------------------------------------------------------------------------
def test_swa_export_is_the_parameter_average_with_recomputed_adv_bn(tiny_model, make_ctx, tiny_batch):
    x, y = tiny_batch
    obj, model = prepared(tiny_model, make_ctx, swa_start=1, swa_bn_batches=2)
    obj.on_epoch_start(model, 0, loader_of(tiny_batch))
    snapshots = []
    opt = torch.optim.SGD(list(model.parameters()) + list(obj.extra_modules().parameters()), lr=0.1)
    model.train()
    for step in range(1, 4):
        opt.zero_grad()
        obj.loss(model, x, y).loss.backward()
        opt.step()
        obj.after_optimizer_step(model, step)
        snapshots.append({n: p.detach().clone() for n, p in merge_branch(model, "adv").named_parameters()})

    state = obj.state_dict()
    exported = obj.export_model(model)
    last = dict(merge_branch(model, "adv").named_parameters())
    for name, p in exported.named_parameters():
        mean = torch.stack([s[name] for s in snapshots]).mean(0)
        torch.testing.assert_close(p.detach(), mean)
    assert any(not torch.allclose(p, last[n]) for n, p in exported.named_parameters())  # not the last weights
    # BN statistics: reset, then a cumulative average over exactly swa_bn_batches batches of PGD examples
    bns = [m for m in exported.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(int(m.num_batches_tracked) == 2 for m in bns)
    adv_stats = [s.adv.running_mean for s in split_modules(model)]
    assert all(not torch.allclose(m.running_mean, a) for m, a in zip(bns, adv_stats, strict=True))

    # the average is part of the resumable state
    obj2, _ = prepared(build_model("small_cnn", get_spec("fashion_mnist")), make_ctx, swa_start=1)
    obj2.load_state_dict(state)
    assert int(obj2._swa.n_averaged) == 3


def official_moving_average(net_swa: nn.Module, net: nn.Module, alpha: float) -> None:
    """Copy of the official SWA update (utils/swa.py `moving_average`), written here."""
    for p1, p2 in zip(net_swa.parameters(), net.parameters(), strict=True):
        p1.data *= 1.0 - alpha
        p1.data += p2.data * alpha


@pytest.mark.parametrize(("swa_every", "swa_start"), [(3, 2), (5, 1)])
def test_swa_follows_the_official_schedule(swa_every: int, swa_start: int, tiny_model, make_ctx, tiny_batch):
    """Averaged steps and average equal the official loop's: step = epoch * len(loader) + batch
    (epoch 1-based), averaged when epoch >= swa_start and step % swa_freq == 0, equal weights."""
    loader = loader_of(tiny_batch)                    # 32 images / 8 = 4 batches per epoch
    obj, model = prepared(tiny_model, make_ctx, swa_start=swa_start, swa_every=swa_every)
    net_swa, swa_n = copy.deepcopy(model), 0
    g = torch.Generator().manual_seed(0)
    step = 0
    for epoch in range(1, 4):
        obj.on_epoch_start(model, epoch - 1, loader)
        for batch_idx in range(len(loader)):
            with torch.no_grad():                     # an "optimizer step": any parameter change will do
                for prm in model.parameters():
                    prm.add_(torch.randn(prm.shape, generator=g))
            step += 1
            obj.after_optimizer_step(model, step)
            official_step = epoch * len(loader) + batch_idx
            if swa_start <= epoch and official_step % swa_every == 0:
                official_moving_average(net_swa, model, 1.0 / (swa_n + 1))
                swa_n += 1
    assert swa_n > 1 and int(obj._swa.n_averaged) == swa_n
    for (name, a), b in zip(obj._swa.module.named_parameters(), net_swa.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_swa_bn_recompute_covers_the_whole_train_set_by_default(tiny_model, make_ctx, tiny_batch):
    loader = loader_of(tiny_batch)
    obj, model = prepared(tiny_model, make_ctx, swa_start=1)
    assert obj.params.swa_bn_batches is None
    obj.on_epoch_start(model, 0, loader)
    sgd_steps(obj, model, *tiny_batch, n=1)
    exported = obj.export_model(model)
    bns = [m for m in exported.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(int(m.num_batches_tracked) == len(loader) == 4 for m in bns)


def official_custom_lr(epochs: int, init_lr: float) -> list[float]:
    """lr of each epoch (1-based) under the official CustomLR: 0.02 at construction, then after
    epoch e `scheduler.step(e)` sets get_lr(e) (x0.1 from 76, x0.01 from 91, x0.001 from 101)."""
    def get_lr(e: int) -> float:
        return init_lr * (1.0 if e <= 75 else 0.1 if e <= 90 else 0.01 if e <= 100 else 0.001)
    return [0.02] + [get_lr(e) for e in range(1, epochs)]


def test_first_epoch_lr_reproduces_the_official_custom_lr():
    from pipeline_lib.training.loop import make_scheduler

    # The paper's "decay at 75 and 90" is, in the official loop, a decay after epochs 76 and 91.
    o = OptimParams(epochs=100, batch_size=128, lr=0.1, milestones=[76, 91], first_epoch_lr=0.02)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=o.lr)
    sched = make_scheduler(opt, o)
    lrs = []
    for _ in range(o.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(official_custom_lr(100, 0.1), rel=1e-12)
    plain = OptimParams(epochs=100, batch_size=128, lr=0.1, milestones=[76, 91])
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=o.lr)
    make_scheduler(opt2, plain)
    assert opt2.param_groups[0]["lr"] == 0.1     # without it, the first epoch runs at lr


def test_swa_never_reached_exports_last_weights_with_a_warning(tiny_model, make_ctx, tiny_batch):
    obj, model = prepared(tiny_model, make_ctx, swa_start=5)
    obj.on_epoch_start(model, 0, loader_of(tiny_batch))
    sgd_steps(obj, model, *tiny_batch, n=1)
    with pytest.warns(RuntimeWarning, match="swa_start=5"):
        exported = obj.export_model(model)
    expected = merge_branch(model, "adv").state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in exported.state_dict().items())


# -- the shared loop -----------------------------------------------------------------------------------
def test_fit_runs_and_is_deterministic(fmnist_spec, make_ctx, tiny_batch):
    def run():
        torch.manual_seed(0)
        model = build_model("small_cnn", fmnist_spec)
        obj = build_objective("arat", {"balance_images": 16}, make_ctx())
        model = obj.prepare_model(model)
        optim = OptimParams(epochs=2, batch_size=8, lr=0.05)
        result = fit(model, obj, loader_of(tiny_batch), loader_of(tiny_batch), optim, seed=0, progress=False)
        return result, obj

    (a, obj), (b, _) = run(), run()
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert all(r["w_adv"] == pytest.approx(r["balance_clean_acc"]) for r in a.history)
    assert {s.branch for s in split_modules(a.model)} == {"adv"}   # the loop's val accuracy sees the adv BN
    sa, sb = obj.export_model(a.model).state_dict(), obj.export_model(b.model).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
