"""`arpipe pretrain` and `arpipe finetune METHOD`.

When params ask for several processes (runtime.nproc_per_node x runtime.nnodes > 1), the
command re-executes itself under torchrun with the same arguments (docs/gpu.md); the
processes it starts see torchrun's environment and train instead of relaunching.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from pipeline_lib.config import Params
from pipeline_lib.io import check_writable

from .common import PARAMS_OPTION, console, fail, load_or_exit

if TYPE_CHECKING:
    from pipeline_lib.training import TrainJob, TrainOutputs

STATE_DIR = Path("cache/train_state")  # resumable state, outside DVC's outputs so a rerun can resume


def relaunch_if_asked(p: Params, stage: str) -> None:
    """Re-run this very command (sys.argv) under torchrun when params ask for several processes;
    exits with torchrun's exit code. A no-op inside a torchrun-started process."""
    # torch-importing modules: imported here, not at module level, so `arpipe gate` / `aggregate` stay torch-free
    from pipeline_lib import distributed
    from pipeline_lib.runtime import resolve_device

    rt = p.runtime
    resolve_device(rt.device)   # no GPU for runtime.device: cuda is one line here, not one per started process
    if distributed.launch_needed(rt.nproc_per_node, rt.nnodes):
        raise typer.Exit(distributed.relaunch(sys.argv[1:], nproc_per_node=rt.nproc_per_node, nnodes=rt.nnodes,
                                              rdzv_endpoint=rt.rdzv_endpoint, run_id=stage))


@contextlib.contextmanager
def interrupt_hint(stage: str, out: Path, state: Path, tracked: tuple[Path, ...]) -> Iterator[None]:
    """On Ctrl-C, say in one line how to get the model back. `dvc repro` deletes a stage's outputs before
    its command starts; the previous checkpoint stays in the DVC cache, recorded in dvc.lock, which a
    failed stage does not update. (persist: true would keep the file but costs the stage DVC's run-cache.)"""
    try:
        yield
    except KeyboardInterrupt:
        resume = f"; `dvc repro` resumes training from {state}" if state.exists() else ""
        if out.exists():
            console.print(f"{stage} interrupted: {out} is unchanged{resume}", soft_wrap=True)
        else:   # metrics are git-tracked (cache: false): git has the previous ones
            gone = " ".join(str(t) for t in tracked if not t.exists())
            git = f" and `git checkout -- {gone}` its metrics" if gone else ""
            console.print(f"{stage} interrupted: `dvc repro` removed the previous {out} before training; "
                          f"`dvc checkout {stage}` restores it from the DVC cache{git}{resume}", soft_wrap=True)
        raise typer.Exit(130) from None


def train(p: Params, job: TrainJob, outputs: TrainOutputs, pretrained: Path | None = None) -> dict[str, Any]:
    """Run `job` with the sections of `p` training reads (data, model, seed, runtime, mlflow)."""
    from pipeline_lib.training import run_training   # looked up when called: tests replace it

    return run_training(job, outputs, data=p.data, model=p.model, seed=p.seed, runtime=p.runtime,
                        experiment=p.mlflow.experiment, pretrained=pretrained)


SEED_OPTION = typer.Option(None, help="training seed instead of params' `seed` (a replicate; see `replicates`)")


def with_seed(p: Params, seed: int | None) -> tuple[Params, str]:
    """Params with `seed` replaced (when given) and the suffix that keeps the replicate's resume state apart."""
    if seed is None:
        return p, ""
    if seed < 0:
        raise fail(f"--seed {seed}: a training seed must be >= 0")
    return p.model_copy(update={"seed": seed}), f"-seed{seed}"


def pretrain(
    out: Path = typer.Option(..., help="model checkpoint to write"),
    metrics: Path = typer.Option(..., help="final metrics JSON"),
    history: Path = typer.Option(..., help="per-epoch metrics CSV"),
    seed: int | None = SEED_OPTION,
    params: Path = PARAMS_OPTION,
) -> None:
    """Standard training of the base model every method starts from."""
    from pipeline_lib.distributed import is_main_process
    from pipeline_lib.training import TrainOutputs, pretrain_job

    p, tag = with_seed(load_or_exit(params), seed)
    outputs = TrainOutputs(out, metrics, history, STATE_DIR / f"pretrain{tag}.pt")
    check_writable(*astuple(outputs))
    relaunch_if_asked(p, f"pretrain{tag}")
    with interrupt_hint(f"pretrain_rep@{seed}" if tag else "pretrain", out, outputs.state, (metrics, history)):
        result = train(p, pretrain_job(p.pretrain.optim, p.threat), outputs)
    if is_main_process():
        console.print(f"pretrain: val clean acc {result['val_clean_acc']:.4f} -> {out}")


def finetune(
    method: str = typer.Argument(..., help="finetune instance, a key of `method` in params"),
    pretrained: Path = typer.Option(..., help="pretrained checkpoint (init and/or teacher)"),
    out: Path = typer.Option(..., help="model checkpoint to write"),
    metrics: Path = typer.Option(..., help="final metrics JSON"),
    history: Path = typer.Option(..., help="per-epoch metrics CSV"),
    seed: int | None = SEED_OPTION,
    params: Path = PARAMS_OPTION,
) -> None:
    """Train one method instance (from the pretrained model or from scratch, as its params say)."""
    from pipeline_lib.distributed import is_main_process
    from pipeline_lib.training import TrainOutputs, finetune_job, needs_pretrained

    p, tag = with_seed(load_or_exit(params), seed)
    if method not in p.method:
        raise fail(f"unknown method {method!r}; params define: {', '.join(sorted(p.method))}")
    job = finetune_job(method, p.method[method], p.finetune.optim, p.threat)
    if needs_pretrained(job) and not pretrained.exists():
        raise fail(f"finetune@{method} starts from or distils the pretrained model, but {pretrained} does not "
                   "exist; run `dvc repro pretrain` (or `arpipe pretrain`) first")
    outputs = TrainOutputs(out, metrics, history, STATE_DIR / f"finetune-{method}{tag}.pt")
    check_writable(*astuple(outputs))
    relaunch_if_asked(p, f"finetune@{method}{tag}")
    with interrupt_hint(f"finetune_rep@{seed}-{method}" if tag else f"finetune@{method}", out, outputs.state,
                        (metrics, history)):
        result = train(p, job, outputs, pretrained)
    if is_main_process():
        console.print(f"finetune@{method}: val clean acc {result['val_clean_acc']:.4f} -> {out}")
