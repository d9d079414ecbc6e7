"""Pretraining and finetuning as library calls: what the `pretrain` and `finetune` stages run."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, distributed
from ..config import DataParams, ModelParams, ParamsError, RuntimeParams
from ..data import BatchLoader, get_spec, load_test, load_train
from ..io import atomic_write, write_json
from ..methods import OBJECTIVES, Objective, ObjectiveContext, build_objective
from ..models import build_model
from ..run_setup import start_run
from ..runtime import check_amp, memory_format, seed_everything
from .loop import fit
from .spec import TrainJob


@dataclass(frozen=True)
class TrainOutputs:
    """Where a training stage writes: the paths named in dvc.yaml, passed in by the stage command."""

    checkpoint: Path
    metrics: Path
    history: Path
    state: Path  # resumable training state; removed once the checkpoint is written


def needs_pretrained(job: TrainJob) -> bool:
    """Whether the job reads the pretrained checkpoint: as its initialisation or as a frozen teacher."""
    return job.init == "pretrained" or OBJECTIVES.get(job.objective).needs_teacher


def job_config(job: TrainJob, data: DataParams, model: ModelParams, seed: int) -> dict[str, Any]:
    """Everything that determines the trained weights (logged, stored in the checkpoint, hashed for resume)."""
    return {
        "name": job.name, "objective": job.objective, "init": job.init, "seed": seed,
        "data": data.model_dump(exclude={"root", "download"}), "model": model.model_dump(),
        "optim": job.optim.model_dump(), "attack": job.attack.model_dump(),
        "params": job.objective_params.model_dump(),
    }


def fingerprint(config: dict[str, Any], init_path: Path | None) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    if init_path is not None:
        h.update(checkpoint.file_sha256(init_path).encode())
    return h.hexdigest()


def prepare_for_training(model: torch.nn.Module, objective: Objective, device: torch.device, *, sync_bn: bool,
                         fmt: torch.memory_format = torch.contiguous_format) -> torch.nn.Module:
    """Move `model` to its device and memory format, synchronise its BatchNorms (several processes),
    and let the objective prepare it.

    BatchNorms are synchronised *before* `prepare_model`, so what the objective builds from the
    model (AR-AT's split clean/adv branches, CURE's revision copy) is synchronised too, and
    the objective's new trainable modules (AR-AT's predictors, with BatchNorm1d) right after.
    """
    model.to(device, memory_format=fmt)
    if sync_bn:
        model = distributed.sync_batchnorm(model, device)
    model = objective.prepare_model(model).to(device, memory_format=fmt)
    if sync_bn:
        distributed.sync_batchnorm(objective.extra_modules(), device)
    return model


def write_history_csv(path: Path, history: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for rec in history:
        keys += [k for k in rec if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda fh: fh.write(buf.getvalue().encode()))


def run_training(job: TrainJob, out: TrainOutputs, *, data: DataParams, model: ModelParams, seed: int,
                 runtime: RuntimeParams, experiment: str, pretrained: Path | None = None) -> dict[str, Any]:
    """Train one model end to end and write its checkpoint, metrics JSON and history CSV.

    The params sections it reads: `data`, `model`, `seed`, `runtime` and `mlflow.experiment`, besides
    the job's own (pretrain.optim, or method.<name> with finetune.optim, and threat).

    `pretrained` is the standard model's checkpoint: the initialisation when
    job.init == 'pretrained' and the frozen teacher for objectives that need one.

    Started by torchrun (runtime.nproc_per_node x nnodes > 1, see stages/train.py), every
    process runs this; it joins the process group, trains on its share of each global batch,
    and rank 0 alone writes the outputs and logs to MLflow (pipeline_lib.distributed).
    """
    with distributed.process_group(runtime.device, runtime.dist_backend) as info:
        return _run_training(job, out, info, data=data, model_params=model, seed=seed, runtime=runtime,
                             experiment=experiment, pretrained=pretrained)


def _run_training(job: TrainJob, out: TrainOutputs, info: distributed.DistInfo, *, data: DataParams,
                  model_params: ModelParams, seed: int, runtime: RuntimeParams, experiment: str,
                  pretrained: Path | None) -> dict[str, Any]:
    rt = runtime
    needs_teacher = OBJECTIVES.get(job.objective).needs_teacher
    if needs_pretrained(job) and (pretrained is None or not pretrained.exists()):
        raise FileNotFoundError(f"{job.name}: needs the pretrained checkpoint, got {pretrained}")
    stage = "pretrain" if job.name == "standard" else f"finetune@{job.name}"
    run = start_run(stage, job.name, rt, experiment=experiment, dist=info)
    device = run.device   # CUDA: GPU local_rank of this node
    check_amp(rt.amp, device)
    fmt = memory_format(rt.channels_last)
    spec = get_spec(data.dataset)

    x_tr, y_tr = load_train(data.dataset, data.root, data.n_train, data.subset_seed, data.download)
    x_va, y_va = load_test(data.dataset, data.root, data.n_val, data.download)
    loader = BatchLoader(x_tr, y_tr, job.optim.batch_size, shuffle=True, augment=data.augmentation,
                         drop_last=True, seed=seed, device=device, storage=rt.loader, num_workers=rt.num_workers,
                         rank=info.rank, world_size=info.world_size, memory_format=fmt)
    # Every rank measures the (small) validation set whole: identical models, identical numbers.
    val = BatchLoader(x_va, y_va, 500, device=device, storage=rt.loader, memory_format=fmt)
    if len(loader) == 0:
        raise ParamsError(f"{job.name}: batch_size={job.optim.batch_size} exceeds the {len(x_tr)} training images "
                          "(data.n_train); lower the batch size or use more images")

    seed_everything(seed)
    model = build_model(model_params.arch, spec)
    init_path = pretrained if job.init == "pretrained" else None
    if init_path is not None:   # on the CPU, as the weights are copied into `model`
        base, _ = checkpoint.load_for_run(init_path, "cpu", dataset=data.dataset, arch=model_params.arch)
        model.load_state_dict(base.state_dict())
    teacher = None
    if needs_teacher:
        teacher, _ = checkpoint.load_for_run(pretrained, device, dataset=data.dataset)  # type: ignore[arg-type]
        teacher.requires_grad_(False).eval().to(memory_format=fmt)
    ctx = ObjectiveContext(attack=job.attack, num_classes=spec.num_classes, device=device,
                           input_shape=(spec.channels, spec.image_size, spec.image_size), teacher=teacher,
                           seed=seed)
    objective = build_objective(job.objective, job.objective_params, ctx)
    model = prepare_for_training(model, objective, device, sync_bn=info.enabled and rt.sync_bn, fmt=fmt)

    config = job_config(job, data, model_params, seed)
    fp = fingerprint(config, init_path)
    with run.tracker(resume_key=fp) as tracker:
        tracker.log_params(config)
        tracker.log_params({"runtime": {**rt.model_dump(), "world_size": info.world_size}})

        def log_epoch(rec: dict[str, float]) -> None:   # a resumed run skips the epochs it holds (Tracker)
            tracker.log_metrics(rec, step=int(rec["epoch"]))

        t0 = time.perf_counter()
        result = fit(model, objective, loader, val, job.optim, seed=seed, state_path=out.state,
                     fingerprint=fp, progress=rt.progress, desc=stage, on_epoch=log_epoch, amp=rt.amp)
        seconds = time.perf_counter() - t0
        final = result.history[-1]
        exported = objective.export_model(result.model)   # every rank: an export may run synchronised BN
        steps = job.optim.epochs * len(loader)
        metrics = {
            "train_time_s": round(sum(r["epoch_time_s"] for r in result.history), 3),
            "wall_time_s": round(seconds, 3),
            "step_time_ms": round(1000 * sum(r["epoch_time_s"] for r in result.history) / steps, 3),
            "epochs": job.optim.epochs,
            "world_size": info.world_size,   # processes that shared each step (train_time_s is wall time)
            "val_clean_acc": final["val_clean_acc"],
            **{k: v for k, v in final.items() if k not in ("epoch", "lr", "epoch_time_s", "val_clean_acc")},
        }
        if not info.is_main:   # rank 0 writes every output; the others only wait for it
            distributed.barrier()
            return metrics
        checkpoint.save_model(out.checkpoint, exported, arch=model_params.arch, dataset=data.dataset,
                              meta={"method": job.name, "objective": job.objective, "config": config,
                                    "epoch": job.optim.epochs, "metrics": metrics, "stage": stage,
                                    "git_commit": tracker.tags["git_commit"]})
        write_json(out.metrics, metrics)
        write_history_csv(out.history, result.history)
        out.state.unlink(missing_ok=True)  # finished: the checkpoint supersedes the resume state
        # The stage's own totals at the last epoch (not a stray step 0); the last epoch's record is logged already.
        tracker.log_metrics({k: v for k, v in metrics.items() if k not in final}, step=job.optim.epochs)
        tracker.set_tags({"checkpoint_path": str(out.checkpoint),
                          "checkpoint_sha256": checkpoint.file_sha256(out.checkpoint)})
        tracker.log_artifact(out.metrics)
        tracker.log_artifact(out.history)
    distributed.barrier()
    return metrics
