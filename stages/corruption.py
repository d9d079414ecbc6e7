"""`arpipe corrupt` (make the corrupted test set once) and `arpipe corruption MODEL` (evaluate on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pipeline_lib.config import Params

from pipeline_lib.io import check_writable

from .common import ALLOW_NAME_MISMATCH, PARAMS_OPTION, console, fail, load_or_exit


def build_set(p: Params, out: Path, samples: Path) -> dict[str, Any]:
    """The corrupt stage's work with the params sections it reads."""
    from pipeline_lib.corruption.build_set import build_corrupted_set

    return build_corrupted_set(out, samples, corruption=p.corruption, data=p.data, runtime=p.runtime,
                               experiment=p.mlflow.experiment)


def score(p: Params, name: str, model: Path, set_dir: Path, metrics: Path, heatmap: Path, *,
          allow_name_mismatch: bool = False) -> dict[str, Any]:
    """The corruption@<name> stage's work with the params sections it reads."""
    from pipeline_lib.corruption.job import run_corruption_eval

    return run_corruption_eval(name, model, set_dir, metrics, heatmap, corruption=p.corruption, data=p.data,
                               runtime=p.runtime, experiment=p.mlflow.experiment,
                               allow_name_mismatch=allow_name_mismatch)


def corrupt(
    out: Path = typer.Option(..., help="folder for the corrupted set (CIFAR-C layout + manifest.json)"),
    samples: Path = typer.Option(..., help="PNG grid showing one test image under every corruption"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Generate the corrupted test set (any dataset) or fetch the released CIFAR-10-C / CIFAR-100-C."""
    p = load_or_exit(params)
    check_writable(out / "manifest.json", samples)
    try:
        result = build_set(p, out, samples)
    except ValueError as exc:   # the set builder's checks of params against the data
        raise fail(str(exc)) from None
    skipped = ", ".join(f"{m} ({r})" for m, r in result["skipped"].items()) or "none"
    console.print(f"corrupt: {result['source']} {result['dataset']}, {len(result['corruptions'])} + "
                  f"{len(result['extra'])} extra corruptions x 5 severities x {result['n_images']} images "
                  f"in {result['build_time_s']:.1f}s -> {out}; skipped: {skipped}")


def corruption(
    name: str = typer.Argument(..., help="model name: 'standard', a finetune instance or an external (imported) model"),
    model: Path = typer.Option(..., help="model checkpoint to evaluate"),
    data: Path = typer.Option(..., help="the corrupt stage's output folder"),
    metrics: Path = typer.Option(..., help="metrics JSON to write"),
    heatmap: Path = typer.Option(..., help="accuracy heatmap PNG to write"),
    params: Path = PARAMS_OPTION,
    allow_name_mismatch: bool = ALLOW_NAME_MISMATCH,
) -> None:
    """Accuracy on every corruption x severity, the mean corruption accuracy and a heatmap."""
    p = load_or_exit(params)
    check_writable(metrics, heatmap)
    result = score(p, name, model, data, metrics, heatmap, allow_name_mismatch=allow_name_mismatch)
    console.print(f"corruption@{name}: clean_acc={result['clean_acc']:.4f} "
                  f"mean_corruption_acc={result['mean_corruption_acc']:.4f}")
