"""The objective plug-in contract shared by every training method.

A method is a small class registered by name. Its heart is one function,

    loss(model, x, y) -> StepOutput      # x: (B, C, H, W) in [0, 1], y: (B,)

in the spirit of TRADES' `trades_loss`: it may craft adversarial examples,
call a frozen teacher, use its own extra modules, and returns the scalar to
back-propagate. Everything else is an optional hook with a no-op default:

    prepare_model(model) -> model         before the optimizer exists (module surgery, heads)
    extra_modules() -> ModuleDict         trainable modules beside the model (predictors)
    on_epoch_start / on_epoch_end         per-epoch work and logged metrics
    before_optimizer_step(model)          e.g. gradient masking (edits .grad only)
    after_optimizer_step(model, step)     e.g. an EMA model update
    state_dict / load_state_dict          resumable method state
    export_model(model) -> model          the model that is saved and evaluated

Its params are a typed schema, `Params`, registered under the same name in
pipeline_lib/method_params/<name>.py, which imports no torch (params are validated with it).

Rules every objective keeps: it never touches the optimizer, and every hook
leaves the model's (and its submodules') train/eval mode as it found it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..attacks import LossFn, ce_loss, pgd_linf
from ..attacks.training import AttackParams
from ..method_params import OBJECTIVE_PARAMS, objective_params
from ..registry import Registry
from ..runtime import preserve_mode
from ..schema import NoParams, StrictModel


@dataclass
class ObjectiveContext:
    attack: AttackParams                 # the training attack (eps, step, steps, bn_mode)
    num_classes: int
    device: torch.device
    input_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of one example, for sizing extra modules
    teacher: nn.Module | None = None     # frozen pretrained model in eval mode (needs_teacher)
    seed: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)  # CPU stream for attack noise


@dataclass
class StepOutput:
    loss: Tensor                                  # scalar to back-propagate
    logits: Tensor | None = None                  # (B, K) logits the train accuracy is measured on
    # Batch means as detached 0-dim tensors, averaged over the epoch by the loop. Never Python floats:
    # float(t) waits for the device every step. The loop sums them in their own dtype (float64 where the
    # sum must be exact).
    stats: dict[str, Tensor] = field(default_factory=dict)


class Objective(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[StrictModel]] = NoParams
    needs_teacher: ClassVar[bool] = False

    def __init__(self, params: StrictModel, ctx: ObjectiveContext) -> None:
        self.params = params
        self.ctx = ctx
        self._extra = nn.ModuleDict()

    # -- the objective -------------------------------------------------------------------------
    @abstractmethod
    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput: ...

    # -- optional hooks ------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def extra_modules(self) -> nn.ModuleDict:
        return self._extra

    def on_epoch_start(self, model: nn.Module, epoch: int, loader: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
        return {}

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        return {}

    def before_optimizer_step(self, model: nn.Module) -> None:
        return None

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def export_model(self, model: nn.Module) -> nn.Module:
        return model

    # -- shared helpers ------------------------------------------------------------------------
    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = ce_loss,
                    x_init: Tensor | None = None, project_init: bool = True) -> Tensor:
        """PGD on `model` with the training attack settings, in the mode `attack.bn_mode` asks for."""
        a = self.ctx.attack
        with preserve_mode(model):
            model.train(a.bn_mode == "train")
            return pgd_linf(model, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps,
                            random_start=a.random_start, loss_fn=loss_fn, generator=self.ctx.generator,
                            x_init=x_init, project_init=project_init)


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register_objective(name: str):
    """Class decorator: register an Objective subclass under `name` and set its `name`. Its `Params` must be
    the schema registered under the same name in pipeline_lib.method_params (torch-free, what params are
    validated with), so what is validated is what the objective gets."""

    def deco(cls: type[Objective]) -> type[Objective]:
        registered = OBJECTIVE_PARAMS.get(name) if name in OBJECTIVE_PARAMS else None
        if cls.Params is not registered:
            raise TypeError(f"objective {name!r}: {cls.__name__}.Params must be the schema registered under {name!r} "
                            f"in pipeline_lib.method_params (@register_params({name!r}))")
        cls.name = name
        return OBJECTIVES.register(name)(cls)

    return deco


def build_objective(name: str, params: StrictModel | Mapping[str, Any] | None, ctx: ObjectiveContext) -> Objective:
    cls = OBJECTIVES.get(name)
    if not isinstance(params, StrictModel):
        params = objective_params(name, name, params or {})
    return cls(params, ctx)
