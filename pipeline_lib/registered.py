"""What only the registries know about the params: the model architecture and each method's objective and params.

`pipeline_lib.config` validates the params file without importing a subsystem (no torch); the
stages call `check_registered` on the loaded params before any work, so an unknown architecture
or a bad method param still stops them with a message naming the key and the value. The registries
it asks import no torch either (the architecture names in pipeline_lib.models, the objectives' params
schemas in pipeline_lib.method_params): the stages that train nothing (aggregate, profile) pay no torch import.
"""

from __future__ import annotations

from .config import Params, ParamsError
from .method_params import objective_params
from .models import known_arch
from .schema import StrictModel


def check_registered(p: Params, source: str = "params") -> dict[str, StrictModel]:
    """Check `model.arch` and every `method.<name>` against the registries; the validated method params
    by instance name. ParamsError names the file, the key and the value."""
    try:
        try:
            known_arch(p.model.arch)
        except ValueError as exc:
            raise ParamsError(f"model.arch: {exc}") from None
        return {name: objective_params(name, spec.objective_of(name), spec.params) for name, spec in p.method.items()}
    except ParamsError as exc:
        raise ParamsError(f"{source}: {exc}") from None
