"""Public entry point: `benchmark(model, ...)` evaluates any nn.Module (eval mode, logits, inputs in
[0, 1]) with the evaluate stage's attacks, record and sanity flags. See pipeline_lib.evaluation.benchmark."""

from .evaluation.benchmark import Evaluation, benchmark, default_evaluate, evaluate_model

__all__ = ["Evaluation", "benchmark", "default_evaluate", "evaluate_model"]
