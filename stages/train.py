"""`arpipe pretrain` and `arpipe finetune METHOD`."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline_lib.training import TrainOutputs, finetune_job, pretrain_job, run_training

from .common import PARAMS_OPTION, console, fail, load_or_exit

STATE_DIR = Path("cache/train_state")  # resumable state, outside DVC's outputs so a rerun can resume


def pretrain(
    out: Path = typer.Option(..., help="model checkpoint to write"),
    metrics: Path = typer.Option(..., help="final metrics JSON"),
    history: Path = typer.Option(..., help="per-epoch metrics CSV"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Standard training of the base model every method starts from."""
    p = load_or_exit(params)
    result = run_training(p, pretrain_job(p), TrainOutputs(out, metrics, history, STATE_DIR / "pretrain.pt"))
    console.print(f"pretrain: val clean acc {result['val_clean_acc']:.4f} -> {out}")


def finetune(
    method: str = typer.Argument(..., help="finetune instance, a key of `method` in params"),
    pretrained: Path = typer.Option(..., help="pretrained checkpoint (init and/or teacher)"),
    out: Path = typer.Option(..., help="model checkpoint to write"),
    metrics: Path = typer.Option(..., help="final metrics JSON"),
    history: Path = typer.Option(..., help="per-epoch metrics CSV"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Train one method instance (from the pretrained model or from scratch, as its params say)."""
    p = load_or_exit(params)
    if method not in p.method:
        raise fail(f"unknown method {method!r}; params define: {', '.join(sorted(p.method))}")
    job = finetune_job(p, method)
    result = run_training(p, job, TrainOutputs(out, metrics, history, STATE_DIR / f"finetune-{method}.pt"),
                          pretrained=pretrained)
    console.print(f"finetune@{method}: val clean acc {result['val_clean_acc']:.4f} -> {out}")
