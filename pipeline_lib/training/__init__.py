"""Training: the shared loop and the pretrain/finetune jobs.

`spec` (what a job is) imports no torch: the aggregate stage builds the finetune jobs to log their settings.
The torch-side names (`job`: running a job, `loop`: the training loop) load on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .spec import TrainJob, finetune_job, pretrain_job

if TYPE_CHECKING:
    from .job import TrainOutputs, needs_pretrained, run_training
    from .loop import FitResult, fit

_LAZY = {"TrainOutputs": "job", "needs_pretrained": "job", "run_training": "job", "FitResult": "loop", "fit": "loop"}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = ["FitResult", "TrainJob", "TrainOutputs", "finetune_job", "fit", "needs_pretrained", "pretrain_job",
           "run_training"]
