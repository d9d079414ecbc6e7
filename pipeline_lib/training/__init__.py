"""Training: the shared loop and the pretrain/finetune jobs."""

from .jobs import TrainJob, TrainOutputs, finetune_job, pretrain_job, run_training
from .loop import FitResult, fit

__all__ = ["FitResult", "TrainJob", "TrainOutputs", "finetune_job", "fit", "pretrain_job", "run_training"]
