"""`arpipe evaluate MODEL`."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline_lib.evaluation.job import run_evaluation

from .common import PARAMS_OPTION, console, load_or_exit


def evaluate(
    name: str = typer.Argument(..., help="model name: 'standard' or a finetune instance"),
    model: Path = typer.Option(..., help="model checkpoint to evaluate"),
    metrics: Path = typer.Option(..., help="metrics JSON to write"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Clean and adversarial accuracy on the first n_eval test images."""
    p = load_or_exit(params)
    result = run_evaluation(p, name, model, metrics)
    console.print(f"evaluate@{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()
                                                  if k.endswith("_acc")))
