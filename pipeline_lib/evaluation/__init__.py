"""Evaluation: clean accuracy and the attack cascade of the `evaluate` stage.

Modules: `accuracy` (clean accuracy, also used by training), `config` (the evaluate
params), `registry` (attacks by name -> cascade steps), `cascade` (the resumable
runner), `record` (who broke what), `autoattack` (the pyautoattack wrapper),
`model_checks`, `sanity` (gradient-masking flags), `record_metrics` (accuracies from the record),
`metric_spec` (a metric's declaration), `plot`, `job` (the stage).
Only `accuracy` is imported here: `pipeline_lib.config` imports `evaluation.config`,
so importing the job at package import time would be circular.
"""

from .accuracy import accuracy, predict

__all__ = ["accuracy", "predict"]
