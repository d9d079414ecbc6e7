"""The `evaluate` stage's work: clean and PGD accuracy of one checkpoint on the first n_eval test images."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..attacks import pgd_linf
from ..config import Params
from ..data import load_test
from ..io import write_json
from ..runtime import configure_determinism, evaluating, frozen_params, resolve_device
from ..tracking import Tracker
from .accuracy import predict


def run_evaluation(p: Params, name: str, model_path: Path, metrics_path: Path) -> dict[str, Any]:
    configure_determinism(p.runtime.deterministic)
    device = resolve_device(p.runtime.device)
    e = p.evaluate
    model, meta = checkpoint.load_model(model_path, device)
    x, y = load_test(p.data.dataset, p.data.root, e.n_eval, p.data.download)
    x, y = x.to(device).float().div_(255), y.to(device)
    stage = f"evaluate@{name}"
    with Tracker(p.mlflow.experiment, stage, tags={"stage": "evaluate", "method": name, "dvc_stage": stage}) as tr:
        tr.log_params({"evaluate": e.model_dump(), "eps": p.threat.eps, "checkpoint": str(model_path)})
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(e.seed)
        clean = predict(model, x, e.batch_size) == y
        robust = clean.clone()
        with evaluating(model), frozen_params(model):
            for i in range(0, len(x), e.batch_size):
                xb, yb = x[i:i + e.batch_size], y[i:i + e.batch_size]
                x_adv = pgd_linf(model, xb, yb, eps=p.threat.eps, step_size=e.pgd.step_size, steps=e.pgd.steps,
                                 restarts=e.pgd.restarts, generator=gen)
                with torch.no_grad():
                    robust[i:i + e.batch_size] &= model(x_adv).argmax(1) == yb
        metrics = {"clean_acc": float(clean.float().mean()), "pgd_acc": float(robust.float().mean()),
                   "pgd_steps": e.pgd.steps,
                   "n_eval": len(y), "eps": p.threat.eps, "eval_time_s": round(time.perf_counter() - t0, 3)}
        write_json(metrics_path, metrics)
        tr.log_metrics(metrics)
        tr.log_artifact(metrics_path)
    return metrics
