"""`arpipe evaluate MODEL`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from pipeline_lib.config import Params
from pipeline_lib.io import check_writable

from .common import ALLOW_NAME_MISMATCH, PARAMS_OPTION, console, fail, load_or_exit

if TYPE_CHECKING:
    from pipeline_lib.evaluation.job import EvalOutputs

STATE_DIR = Path("cache/eval_state")  # resumable state, outside DVC's outputs so a rerun can resume


def state_name(name: str, metrics: Path) -> str:
    """The resume-state folder's name: the model's, plus its replicate's seed<k> folder when it has one."""
    parent = metrics.parent.name
    return f"{parent}-{name}" if parent.startswith("seed") and parent[4:].isdigit() else name


def run(p: Params, name: str, model: Path, out: EvalOutputs, *, allow_name_mismatch: bool = False) -> dict[str, Any]:
    """The evaluate@<name> stage's work with the params sections it reads."""
    from pipeline_lib.evaluation import job   # looked up when called: tests replace run_evaluation

    return job.run_evaluation(name, model, out, evaluate=p.evaluate, eps=p.threat.eps, data=p.data,
                              runtime=p.runtime, experiment=p.mlflow.experiment,
                              allow_name_mismatch=allow_name_mismatch)


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
    from pipeline_lib.evaluation.job import EvalOutputs

    p = load_or_exit(params)
    if not model.exists():
        raise fail(f"model checkpoint {model} does not exist")
    out = EvalOutputs(metrics, record, log, plot, STATE_DIR / state_name(name, metrics))
    check_writable(metrics, record, log, plot, out.state_dir / "state.pt")
    result = run(p, name, model, out, allow_name_mismatch=allow_name_mismatch)
    console.print(f"evaluate@{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items() if k.endswith("_acc"))
                  + f" ({result['eval_time_s']:.1f} s)")
    for message in result["warnings"]:
        console.print(f"[bold yellow]sanity flag[/]: {escape(message)}")
