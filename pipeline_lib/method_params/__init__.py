"""Each training objective's params schema, registered by the objective's name; no torch.

Validating a params file needs every objective's params but none of its training code, so the
schemas live here, one module per objective, named as its `pipeline_lib/methods/<name>.py`:

    @register_params("arrest")
    class ArrestParams(StrictModel): ...        # method_params/arrest.py

and the objective names its schema, `Params = ArrestParams` (methods/arrest.py). `register_objective`
refuses an objective whose Params is not the schema registered under its name, and
tests/test_methods_contract.py checks that both registries hold the same names. So `check_registered`
(pipeline_lib.registered) and the training jobs' settings (pipeline_lib.training.spec) cost the stages
that train nothing (aggregate, profile) no torch import.

Importing this package imports every module in it, as pipeline_lib.methods does.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from ..config import ParamsError, format_errors
from ..registry import Registry
from ..schema import StrictModel

OBJECTIVE_PARAMS: Registry[type[StrictModel]] = Registry("objective")


def register_params(name: str) -> Callable[[type[StrictModel]], type[StrictModel]]:
    """Class decorator: register a StrictModel as the params schema of objective `name`."""
    return OBJECTIVE_PARAMS.register(name)


def objective_params(instance: str, objective: str, raw: Mapping[str, Any]) -> StrictModel:
    """The validated params of finetune instance `instance` (registered objective `objective`): the one
    place a method's params are checked. ParamsError names `method.<instance>` and each bad key."""
    if objective not in OBJECTIVE_PARAMS:
        raise ParamsError(f"method.{instance}: unknown objective {objective!r}; "
                          f"registered: {', '.join(OBJECTIVE_PARAMS.names())}")
    try:
        return OBJECTIVE_PARAMS.get(objective).model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(f"method.{instance}.params: {format_errors(exc)}") from None


for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["OBJECTIVE_PARAMS", "objective_params", "register_params"]
