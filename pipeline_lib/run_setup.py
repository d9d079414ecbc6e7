"""The start-up every stage's job shares, written once so the stages cannot drift apart.

`start_run` applies `runtime` (deterministic kernels, `num_threads`, the device) and returns a
`RunSetup` that starts the stage's MLflow run with the common tags. Every checkpoint a stage reads
goes through `checkpoint.load_for_run` (trained as the name, on the dataset, as the architecture):
it lives there so that the `corrupt` stage, which reads none, does not depend on the model code.
The CPU-kernel choice (`runtime.numerics`) is the one setting applied earlier, by the stage
process before torch loads (pipeline_lib.numerics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RuntimeParams
from .distributed import DistInfo, device_for
from .runtime import configure_determinism, resolve_device
from .tracking import Tracker


@dataclass(frozen=True)
class RunSetup:
    stage: str               # the DVC stage, e.g. "finetune@arrest" (the MLflow run name)
    method: str | None       # the model the stage is about ('standard', an instance, an imported model); None: none
    experiment: str          # mlflow.experiment
    device: torch.device
    is_main: bool = True     # several processes: rank 0 alone logs

    def tracker(self, resume_key: str | None = None) -> Tracker:
        """The stage's MLflow run (continued when `resume_key` matches an unfinished one), tagged alike
        in every stage: stage (without the matrix key), method (when the stage has one), dvc_stage."""
        tags = {"stage": self.stage.split("@")[0], "dvc_stage": self.stage}
        if self.method is not None:
            tags["method"] = self.method
        return Tracker(self.experiment, self.stage, tags=tags, enabled=self.is_main, resume_key=resume_key)


def start_run(stage: str, method: str | None, runtime: RuntimeParams, *, experiment: str,
              dist: DistInfo | None = None) -> RunSetup:
    """Apply `runtime` to this process and pick the device (with `dist`: this process's GPU)."""
    configure_determinism(runtime.deterministic)
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    device = device_for(runtime.device, dist) if dist is not None else resolve_device(runtime.device)
    return RunSetup(stage, method, experiment, device, is_main=dist is None or dist.is_main)
