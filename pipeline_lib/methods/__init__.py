"""Training objectives, registered by name.

Importing this package imports every module in it, so a new method is one new
file with a `@register_objective("name")` class, plus its params schema in
pipeline_lib/method_params/<name>.py (`@register_params("name")`, no torch): nothing else to edit.
"""

import importlib
import pkgutil

from .base import OBJECTIVES, Objective, ObjectiveContext, StepOutput, build_objective, register_objective

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_") and _mod != "base":
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["OBJECTIVES", "Objective", "ObjectiveContext", "StepOutput", "build_objective", "register_objective"]
