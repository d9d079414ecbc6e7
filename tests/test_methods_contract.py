"""The objective contract (pipeline_lib/methods/base.py), checked for EVERY registered objective.

Each test is parametrised over `OBJECTIVES.names()`, so a new method file is covered
as soon as it registers itself. Every objective runs with its default Params (and a
frozen teacher when `needs_teacher`) through the step sequence the training loop uses:

    prepare_model -> on_epoch_start -> [loss -> backward -> before_optimizer_step
    -> SGD step -> after_optimizer_step] x steps -> on_epoch_end -> export_model
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from pipeline_lib.method_params import OBJECTIVE_PARAMS
from pipeline_lib.methods import OBJECTIVES, Objective, StepOutput, build_objective, register_objective
from pipeline_lib.models import build_model
from pipeline_lib.runtime import evaluating, seed_everything
from pipeline_lib.schema import NoParams, StrictModel

NAMES = OBJECTIVES.names()
MODES = ["train", "eval", "mixed"]


@dataclass
class Run:
    objective: Objective
    model: nn.Module
    extra: nn.ModuleDict
    teacher: nn.Module | None
    opt: torch.optim.Optimizer

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return ([(f"model.{n}", p) for n, p in self.model.named_parameters() if p.requires_grad]
                + [(f"extra.{n}", p) for n, p in self.extra.named_parameters() if p.requires_grad])

    def modules(self) -> list[tuple[str, nn.Module]]:
        nets = [("model", self.model), ("extra", self.extra)]
        if self.teacher is not None:
            nets.append(("teacher", self.teacher))
        return [(f"{prefix}.{n}", m) for prefix, net in nets for n, m in net.named_modules()]


def make_run(name: str, base: nn.Module, make_ctx: Callable[..., Any], seed: int = 0) -> Run:
    """A fresh objective, model (a copy of `base`) and optimizer, as `run_training` builds them."""
    seed_everything(seed)
    cls = OBJECTIVES.get(name)
    teacher = None
    if cls.needs_teacher:  # the pretrained model: here the student's own starting weights, frozen
        teacher = copy.deepcopy(base).requires_grad_(False).eval()
    objective = build_objective(name, None, make_ctx(teacher=teacher, seed=seed))
    model = objective.prepare_model(copy.deepcopy(base))
    extra = objective.extra_modules()
    params = [p for p in model.parameters() if p.requires_grad] + [p for p in extra.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    return Run(objective, model, extra, teacher, opt)


def set_mode(net: nn.Module, how: str) -> None:
    """train, eval, or mixed: train with every other submodule in eval (a model whose modes
    an objective must restore one by one, not with a blanket .train())."""
    net.train(how != "eval")
    if how == "mixed":
        for i, m in enumerate(net.modules()):
            if i % 2:
                m.eval()


def mode_snapshot(run: Run) -> dict[str, bool]:
    return {n: m.training for n, m in run.modules()}


def param_snapshot(run: Run) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in run.trainable()}


def assert_same_modes(before: dict[str, bool], run: Run, hook: str) -> None:
    after = mode_snapshot(run)
    changed = [n for n in before if before[n] != after.get(n)]
    assert not changed, f"{run.objective.name}.{hook} changed the train/eval mode of {changed[:5]}"


def assert_params_unchanged(before: dict[str, Tensor], run: Run, hook: str) -> None:
    changed = [n for n, p in run.trainable() if not torch.equal(p.detach(), before[n])]
    assert not changed, f"{run.objective.name}.{hook} changed parameter data {changed[:5]}"


def assert_finite_stats(stats: dict[str, float], where: str) -> None:
    for k, v in stats.items():
        assert math.isfinite(float(v)), f"{where}: stat {k} = {v} is not finite"


def step(run: Run, x: Tensor, y: Tensor, step_no: int, check: bool = True) -> Tensor:
    """One loop step (zero_grad, loss, backward, before_optimizer_step, SGD step,
    after_optimizer_step), checking the contract at every hook; returns the detached loss."""
    obj, name = run.objective, run.objective.name
    run.opt.zero_grad(set_to_none=True)
    modes, params = mode_snapshot(run), param_snapshot(run)
    opt_state = copy.deepcopy(run.opt.state_dict())

    out = obj.loss(run.model, x, y)
    assert_same_modes(modes, run, "loss")
    assert_params_unchanged(params, run, "loss")
    assert isinstance(out.loss, Tensor) and out.loss.ndim == 0, f"{name}: loss is not a scalar tensor"
    assert torch.isfinite(out.loss), f"{name}: loss {out.loss} is not finite"
    assert out.loss.requires_grad, f"{name}: loss does not depend on any parameter"
    if out.logits is not None:
        assert out.logits.shape == (len(y), obj.ctx.num_classes), f"{name}: logits {tuple(out.logits.shape)}"
    assert_finite_stats(out.stats, f"{name}.loss")

    out.loss.backward()
    if check:
        missing = [n for n, p in run.trainable() if p.grad is None]
        assert not missing, f"{name}: no gradient reached {missing[:5]}"
        bad = [n for n, p in run.trainable() if not torch.isfinite(p.grad).all()]
        assert not bad, f"{name}: non-finite gradient in {bad[:5]}"
        if run.teacher is not None:
            leaked = [n for n, p in run.teacher.named_parameters() if p.grad is not None]
            assert not leaked, f"{name}: the teacher got gradients in {leaked[:5]}"

    obj.before_optimizer_step(run.model)
    assert_same_modes(modes, run, "before_optimizer_step")
    assert_params_unchanged(params, run, "before_optimizer_step")
    assert _same_nested(run.opt.state_dict(), opt_state), f"{name}: the optimizer state changed before its step"
    if check:
        bad = [n for n, p in run.trainable() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f"{name}.before_optimizer_step left non-finite gradients in {bad[:5]}"

    run.opt.step()
    obj.after_optimizer_step(run.model, step_no)
    assert_same_modes(modes, run, "after_optimizer_step")
    return out.loss.detach()


def _same_nested(a: Any, b: Any) -> bool:
    """Exact equality of nested dicts / lists / tensors / numbers (state dicts)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_nested, a, b))
    return a == b


def _batches(x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    return [(x[:16], y[:16]), (x[16:], y[16:])]


# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_params_have_valid_defaults_and_reject_unknown_keys(name: str) -> None:
    cls = OBJECTIVES.get(name)
    assert cls.name == name
    cls.Params()  # every key has a default: `params: {}` in params.yaml is valid
    with pytest.raises(ValidationError):
        cls.Params.model_validate({"no_such_param": 1})


@pytest.mark.parametrize("name", sorted(set(NAMES) | set(OBJECTIVE_PARAMS.names())))
def test_the_torch_free_params_registry_agrees_with_the_objectives(name: str) -> None:
    """Params are validated with pipeline_lib.method_params (no torch) and trained with the objective's
    `Params`: both registries hold the same names, and the objective's Params is the registered schema."""
    assert name in OBJECTIVES, f"method_params registers {name!r}, which no objective in pipeline_lib/methods is"
    assert name in OBJECTIVE_PARAMS, f"objective {name!r} has no params schema in pipeline_lib/method_params"
    assert OBJECTIVES.get(name).Params is OBJECTIVE_PARAMS.get(name)


def test_an_objective_is_refused_unless_its_params_are_the_registered_schema() -> None:
    class Other(StrictModel):
        x: int = 0

    def objective(params: type[StrictModel]) -> type[Objective]:
        class Candidate(Objective):
            Params = params

            def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
                return StepOutput(model(x).sum())

        return Candidate

    with pytest.raises(TypeError, match="'arrest'.*method_params"):
        register_objective("arrest")(objective(Other))              # not the schema registered under its name
    with pytest.raises(TypeError, match="'unregistered'.*method_params"):
        register_objective("unregistered")(objective(NoParams))     # no schema registered under its name
    assert OBJECTIVES.get("arrest").Params is OBJECTIVE_PARAMS.get("arrest") and "unregistered" not in OBJECTIVES


@pytest.mark.parametrize("how", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_step_sequence_keeps_the_contract(name: str, how: str, tiny_model, tiny_batch, make_ctx) -> None:
    x, y = tiny_batch
    run = make_run(name, tiny_model, make_ctx)
    set_mode(run.model, how)
    set_mode(run.extra, how)

    modes = mode_snapshot(run)
    assert_finite_stats(run.objective.on_epoch_start(run.model, 0, _batches(x, y)), f"{name}.on_epoch_start")
    assert_same_modes(modes, run, "on_epoch_start")

    before = param_snapshot(run)
    step(run, x, y, 1)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in run.trainable()), \
        f"{name}: one SGD step changed no parameter"

    modes = mode_snapshot(run)
    assert_finite_stats(run.objective.on_epoch_end(run.model, 0), f"{name}.on_epoch_end")
    assert_same_modes(modes, run, "on_epoch_end")


@pytest.mark.parametrize("name", NAMES)
def test_export_gives_eval_logits_loadable_as_the_registered_arch(name: str, tiny_model, tiny_batch, make_ctx,
                                                                   fmnist_spec) -> None:
    x, y = tiny_batch
    run = make_run(name, tiny_model, make_ctx)
    run.model.train()
    run.objective.on_epoch_start(run.model, 0, _batches(x, y))
    step(run, x, y, 1, check=False)
    modes = mode_snapshot(run)
    exported = run.objective.export_model(run.model)
    assert_same_modes(modes, run, "export_model")
    with torch.no_grad(), evaluating(exported):
        logits = exported(x)
    assert logits.shape == (len(x), 10)
    assert torch.isfinite(logits).all()
    # The finetune stage saves the exported weights under the registered arch and
    # `checkpoint.load_model` rebuilds that arch: the keys must match exactly.
    plain = build_model("small_cnn", fmnist_spec)
    plain.load_state_dict(exported.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), logits, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_identical_losses_and_gradients(name: str, tiny_model, tiny_batch, make_ctx) -> None:
    x, y = tiny_batch

    def two_steps() -> tuple[list[Tensor], dict[str, Tensor], dict[str, Tensor]]:
        run = make_run(name, tiny_model, make_ctx, seed=3)
        run.model.train()
        run.objective.on_epoch_start(run.model, 0, _batches(x, y))
        losses = [step(run, x, y, 1, check=False)]
        grads = {n: p.grad.clone() for n, p in run.trainable() if p.grad is not None}
        losses.append(step(run, x, y, 2, check=False))
        return losses, grads, param_snapshot(run)

    losses_a, grads_a, params_a = two_steps()
    losses_b, grads_b, params_b = two_steps()
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b, strict=True)), (losses_a, losses_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_identically(name: str, tiny_model, tiny_batch, make_ctx) -> None:
    """What the loop's resume does: save model/extra/optimizer/objective state (torch.save,
    loaded back with weights_only=True), rebuild everything fresh, load, take the same next step."""
    x, y = tiny_batch
    a = make_run(name, tiny_model, make_ctx, seed=1)
    a.model.train()
    a.objective.on_epoch_start(a.model, 0, _batches(x, y))
    step(a, x, y, 1, check=False)
    buf = io.BytesIO()
    torch.save({"model": a.model.state_dict(), "extra": a.extra.state_dict(), "opt": a.opt.state_dict(),
                "objective": a.objective.state_dict()}, buf)
    rng = (a.objective.ctx.generator.get_state(), torch.get_rng_state())
    loss_a = step(a, x, y, 2, check=False)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = make_run(name, tiny_model, make_ctx, seed=1)
    b.model.load_state_dict(saved["model"])
    b.extra.load_state_dict(saved["extra"])
    b.opt.load_state_dict(saved["opt"])
    b.objective.load_state_dict(saved["objective"])
    assert _same_nested(b.objective.state_dict(), saved["objective"]), f"{name}: state_dict round trip differs"
    b.model.train()
    b.objective.ctx.generator.set_state(rng[0])
    torch.set_rng_state(rng[1])
    loss_b = step(b, x, y, 2, check=False)
    assert torch.equal(loss_a, loss_b), f"{name}: resumed step gives {loss_b}, uninterrupted {loss_a}"
    pa, pb = param_snapshot(a), param_snapshot(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa), f"{name}: resumed weights differ"


@pytest.mark.parametrize("name", NAMES)
def test_stats_are_detached_tensors(name: str, tiny_model, tiny_batch, make_ctx) -> None:
    """No host sync in the training step: a stat given as a Python number (`float(ce)`) makes the
    step wait for the device; the loop sums the tensors where they are and reads them once per epoch."""
    x, y = tiny_batch
    run = make_run(name, tiny_model, make_ctx)
    run.model.train()
    run.objective.on_epoch_start(run.model, 0, _batches(x, y))
    out = run.objective.loss(run.model, x, y)
    for k, v in out.stats.items():
        assert isinstance(v, Tensor), f"{name}: stat {k} is a {type(v).__name__}, not a tensor"
        assert v.ndim == 0 and not v.requires_grad, f"{name}: stat {k} is not a detached scalar ({v})"
