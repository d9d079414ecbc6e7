"""The `evaluate` stage's work: one checkpoint on the first n_eval test images, every attack, resumably.

Outputs (paths from dvc.yaml, through the stage command):
    metrics  JSON: clean_acc, fgsm_acc, pgd_acc, cw_acc, autoattack_acc, worst_case_acc (fractions;
             an attack not run is absent), ci95 ({<key>_acc: {lo, hi}}: Wilson 95 % bounds), pgd_acc_eps_<eps> for the sweep, pgd_steps, n_eval, eps,
             eval_time_s, time_s per attack, autoattack_after (accuracy after each component),
             flags (sanity checks made -> raised?) and warnings (their messages)
    record   CSV: which attack broke which test image (see evaluation.record)
    log      the evaluation log, AutoAttack's own DEBUG log included
    plot     PNG: accuracy per attack and PGD accuracy against eps
The resumable state (record so far + log so far) lives in `state_dir`, outside DVC's
outputs, fingerprinted by checkpoint hash, params and device; it is removed once
the outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..config import DataParams, RuntimeParams
from ..data import get_spec, load_test
from ..io import atomic_write, write_json
from ..run_setup import start_run
from .autoattack import capture_logs
from .benchmark import evaluate_model
from .config import EvaluateParams, check_against
from .plot import plot_evaluation
from .record import STATE_FORMAT
from .registry import AttackEnv, AttackStep, plan_steps
from .record_metrics import worst_case_columns

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOutputs:
    metrics: Path
    record: Path
    log: Path
    plot: Path
    state_dir: Path   # resumable state; removed once the outputs above are written


def eval_fingerprint(e: EvaluateParams, *, dataset: str, eps: float, checkpoint_sha256: str, device: torch.device,
                     steps: list[AttackStep]) -> str:
    """Everything that determines the record: a rerun with any of it changed must not reuse state."""
    config = {"format": STATE_FORMAT, "checkpoint": checkpoint_sha256, "dataset": dataset,
              "eps": eps, "device": device.type, "steps": [st.name for st in steps],
              "evaluate": e.model_dump(exclude={"models", "sanity_tolerance"})}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def run_evaluation(name: str, model_path: Path, out: EvalOutputs, *, evaluate: EvaluateParams, eps: float,
                   data: DataParams, runtime: RuntimeParams, experiment: str,
                   allow_name_mismatch: bool = False) -> dict[str, Any]:
    """Evaluate the checkpoint at `model_path` as model `name` (it must have been trained as `name`,
    unless `allow_name_mismatch`) and write `out`; resumes from out.state_dir.

    The params it reads: `evaluate`, `threat.eps`, `data`, `runtime` and `mlflow.experiment`."""
    e = evaluate
    spec = get_spec(data.dataset)
    check_against(e, dataset=data.dataset, num_classes=spec.num_classes, eps=eps)
    stage = f"evaluate@{name}"
    run = start_run(stage, name, runtime, experiment=experiment)
    device = run.device
    model, meta = checkpoint.load_for_run(model_path, device, dataset=data.dataset, name=name,
                                         allow_name_mismatch=allow_name_mismatch)
    x, y = load_test(data.dataset, data.root, e.n_eval, data.download)
    x, y = x.to(device).float().div_(255), y.to(device)

    sha = checkpoint.file_sha256(model_path)
    out.state_dir.mkdir(parents=True, exist_ok=True)
    state_path, log_path = out.state_dir / "state.pt", out.state_dir / "eval.log"
    # The fingerprint of what determines the record keys both the resumable state and the MLflow run
    # a resumed evaluation continues (planning the steps builds closures only: no attack runs here).
    planned = plan_steps(e, AttackEnv(model, eps, device, e.seed, e.batch_size))
    fp = eval_fingerprint(e, dataset=data.dataset, eps=eps, checkpoint_sha256=sha, device=device, steps=planned)
    with run.tracker(resume_key=fp) as tr:
        with capture_logs(log_path):
            log.info("%s: %s (%s) on %s", stage, model_path, meta["arch"], data.dataset)
            # the same function as the public benchmark(): the stage adds files, MLflow and resumption
            ev = evaluate_model(model, x, y, e, eps=eps, num_classes=spec.num_classes, device=device,
                                state_path=state_path, fingerprint=lambda _: fp, progress=runtime.progress,
                                desc=stage, steps=planned)
        record, steps, acc, report, metrics = ev.record, ev.steps, ev.accuracies, ev.report, ev.metrics
        tr.log_params({"evaluate": e.model_dump(exclude={"models"}), "eps": eps, "checkpoint": str(model_path),
                       "checkpoint_sha256": sha, "steps": [st.name for st in steps]})

        write_json(out.metrics, metrics)
        record.write_csv(out.record, worst_case_columns(steps))
        plot_evaluation(out.plot, f"{stage}: {meta['arch']} on {data.dataset}, first {record.n} test images",
                        acc, ev.curve, eps, report.raised)
        log_bytes = log_path.read_bytes()
        atomic_write(out.log, lambda fh: fh.write(log_bytes))

        tr.log_metrics({**metrics, **{f"flag_{k}": int(v) for k, v in report.flags.items()}})
        tr.set_tags({"sanity_flags": ",".join(report.raised) or "none"})
        for path in (out.metrics, out.record, out.log, out.plot):
            tr.log_artifact(path)
    shutil.rmtree(out.state_dir, ignore_errors=True)  # finished: the outputs supersede the resume state
    return metrics
