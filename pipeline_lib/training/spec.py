"""What a training job is: its objective, validated params, optim and attack. No torch.

The `pretrain` and `finetune` stages build their job here and run it (`job.run_training`); the aggregate
stage builds the same jobs to log each model's settings to MLflow (pipeline_lib.tracking_layout), so the
logged settings are the trained ones, without importing a method's training code.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..attacks.training import AttackParams, training_attack
from ..config import MethodSpec, OptimParams, ThreatParams
from ..method_params import objective_params
from ..schema import NoParams, StrictModel


@dataclass(frozen=True)
class TrainJob:
    name: str                 # "standard" for pretraining, else the finetune instance name
    objective: str
    objective_params: StrictModel
    optim: OptimParams
    attack: AttackParams
    init: str                 # "pretrained" | "scratch"


def pretrain_job(optim: OptimParams, threat: ThreatParams) -> TrainJob:
    """Standard training of the base model (pretrain.optim); its attack is threat's, unused by the objective."""
    return TrainJob("standard", "standard", NoParams(), optim, training_attack(threat), "scratch")


def finetune_job(name: str, spec: MethodSpec, defaults: OptimParams, threat: ThreatParams) -> TrainJob:
    """Finetune instance `name` (method.<name>), its optim merged over finetune.optim (`defaults`) and its
    attack over threat's; its params validated by the objective's schema (ParamsError names the key)."""
    objective = spec.objective_of(name)
    params = objective_params(name, objective, spec.params)
    return TrainJob(name, objective, params, spec.merged_optim(defaults), training_attack(threat, spec.attack),
                    spec.init)
