"""Training objectives, registered by name. Importing this package registers them all."""

from . import pgd_at, standard  # noqa: F401  (registration side effect)
from .base import OBJECTIVES, Objective, ObjectiveContext, StepOutput, build_objective, register_objective

__all__ = ["OBJECTIVES", "Objective", "ObjectiveContext", "StepOutput", "build_objective", "register_objective"]
