"""Evaluation: clean accuracy and the attack cascade of the `evaluate` stage.

Modules: `accuracy` (clean accuracy, also used by training), `config` (the evaluate
params), `registry` (attacks by name -> cascade steps), `cascade` (the resumable
runner), `record` (who broke what), `autoattack` (the pyautoattack wrapper),
`model_checks`, `sanity` (gradient-masking flags), `record_metrics` (accuracies from the record),
`metric_spec` (a metric's declaration), `plot`, `job` (the stage).
Nothing is imported here: `pipeline_lib.config` imports `evaluation.config`, which runs this
file first, and must not pull in torch.
"""
