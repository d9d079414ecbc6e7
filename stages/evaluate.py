"""`arpipe evaluate MODEL`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from pipeline_lib.io import check_writable

from .common import ALLOW_NAME_MISMATCH, PARAMS_OPTION, console, fail, load_or_exit

STATE_DIR = Path("cache/eval_state")  # resumable state, outside DVC's outputs so a rerun can resume


def state_name(name: str, metrics: Path) -> str:
    """The resume-state folder's name: the model's, plus its replicate's seed<k> folder when it has one."""
    parent = metrics.parent.name
    return f"{parent}-{name}" if parent.startswith("seed") and parent[4:].isdigit() else name


def evaluate(
    name: str = typer.Argument(..., help="model name: 'standard', a finetune instance or an external (imported) model"),
    model: Path = typer.Option(..., help="model checkpoint to evaluate"),
    metrics: Path = typer.Option(..., help="metrics JSON to write"),
    record: Path = typer.Option(..., help="per-example record CSV (which attack broke which image)"),
    log: Path = typer.Option(..., help="evaluation log, AutoAttack's log included"),
    plot: Path = typer.Option(..., help="PNG: accuracy per attack and against eps"),
    params: Path = PARAMS_OPTION,
    allow_name_mismatch: bool = ALLOW_NAME_MISMATCH,
) -> None:
    """Clean, FGSM, PGD, CW and AutoAttack accuracy on the first n_eval test images (resumable)."""
    from pipeline_lib.evaluation.job import EvalOutputs, run_evaluation

    p = load_or_exit(params)
    if not model.exists():
        raise fail(f"model checkpoint {model} does not exist")
    out = EvalOutputs(metrics, record, log, plot, STATE_DIR / state_name(name, metrics))
    check_writable(metrics, record, log, plot, out.state_dir / "state.pt")
    result = run_evaluation(p, name, model, out, allow_name_mismatch=allow_name_mismatch)
    console.print(f"evaluate@{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items() if k.endswith("_acc"))
                  + f" ({result['eval_time_s']:.1f} s)")
    for message in result["warnings"]:
        console.print(f"[bold yellow]sanity flag[/]: {escape(message)}")
