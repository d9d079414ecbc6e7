"""Training: the shared loop and the pretrain/finetune jobs."""

from .job import TrainJob, TrainOutputs, finetune_job, needs_pretrained, pretrain_job, run_training
from .loop import FitResult, fit

__all__ = ["FitResult", "TrainJob", "TrainOutputs", "finetune_job", "fit", "needs_pretrained", "pretrain_job",
           "run_training"]
