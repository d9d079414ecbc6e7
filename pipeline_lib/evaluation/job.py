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
from ..config import Params
from ..data import get_spec, load_test
from ..io import atomic_write, write_json
from ..runtime import configure_determinism, resolve_device
from ..stats import interval_block
from ..tracking import Tracker
from .autoattack import capture_logs
from .cascade import run_cascade
from .config import EvaluateConfigError, EvaluateParams, check_against
from .plot import plot_evaluation
from .record import STATE_FORMAT
from .registry import AttackEnv, AttackStep, plan_steps, sweep_metric
from .sanity import sanity_report
from .summary import accuracies, autoattack_progress, step_times, worst_case_columns

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOutputs:
    metrics: Path
    record: Path
    log: Path
    plot: Path
    state_dir: Path   # resumable state; removed once the outputs above are written


def eval_fingerprint(p: Params, checkpoint_sha256: str, device: torch.device, steps: list[AttackStep]) -> str:
    """Everything that determines the record: a rerun with any of it changed must not reuse state."""
    config = {"format": STATE_FORMAT, "checkpoint": checkpoint_sha256, "dataset": p.data.dataset,
              "eps": p.threat.eps, "device": device.type, "steps": [st.name for st in steps],
              "evaluate": p.evaluate.model_dump(exclude={"models", "sanity_tolerance"})}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def eps_curve(acc: dict[str, float], e: EvaluateParams, eps: float) -> list[tuple[float, float]]:
    """(eps, PGD accuracy) points: clean at 0, the sweep, and threat.eps when pgd_acc is independent."""
    pts = [(0.0, acc["clean_acc"])] + [(v, acc[sweep_metric(v)]) for v in e.eps_sweep]
    if "pgd_acc" in acc and not e.cascade:
        pts.append((eps, acc["pgd_acc"]))
    return sorted(pts)


def run_evaluation(p: Params, name: str, model_path: Path, out: EvalOutputs) -> dict[str, Any]:
    e = p.evaluate
    eps = p.threat.eps
    spec = get_spec(p.data.dataset)
    check_against(e, dataset=p.data.dataset, num_classes=spec.num_classes, eps=eps)
    configure_determinism(p.runtime.deterministic)
    if p.runtime.num_threads:
        torch.set_num_threads(p.runtime.num_threads)
    device = resolve_device(p.runtime.device)
    model, meta = checkpoint.load_model(model_path, device)
    if meta["dataset"] != p.data.dataset:
        raise EvaluateConfigError(f"{model_path} was trained on {meta['dataset']}, params evaluate on "
                                  f"data.dataset={p.data.dataset}")
    x, y = load_test(p.data.dataset, p.data.root, e.n_eval, p.data.download)
    x, y = x.to(device).float().div_(255), y.to(device)

    steps = plan_steps(e, AttackEnv(model, eps, device, e.seed, e.batch_size))
    sha = checkpoint.file_sha256(model_path)
    out.state_dir.mkdir(parents=True, exist_ok=True)
    state_path, log_path = out.state_dir / "state.pt", out.state_dir / "eval.log"
    stage = f"evaluate@{name}"
    with Tracker(p.mlflow.experiment, stage, tags={"stage": "evaluate", "method": name, "dvc_stage": stage}) as tr:
        tr.log_params({"evaluate": e.model_dump(exclude={"models"}), "eps": eps, "checkpoint": str(model_path),
                       "checkpoint_sha256": sha, "steps": [st.name for st in steps]})
        with capture_logs(log_path):
            log.info("%s: %s (%s), first %d test images of %s, eps=%g, steps: %s", stage, model_path,
                     meta["arch"], len(y), p.data.dataset, eps, ", ".join(st.name for st in steps))
            record = run_cascade(model, x, y, steps, batch_size=e.batch_size, seed=e.seed, cascade=e.cascade,
                                 num_classes=spec.num_classes, state_path=state_path,
                                 fingerprint=eval_fingerprint(p, sha, device, steps),
                                 progress=p.runtime.progress, desc=stage)
            acc = accuracies(record, steps, e.cascade)
            curve = eps_curve(acc, e, eps)
            attack_acc = {k.removesuffix("_acc"): v for k, v in acc.items()
                          if k in ("fgsm_acc", "pgd_acc", "cw_acc", "autoattack_acc")}
            report = sanity_report(attack_acc, curve, tol=e.sanity_tolerance, compare_attacks=not e.cascade)
            for message in report.messages:
                log.warning("%s: SANITY FLAG: %s", stage, message)
            times = step_times(record, steps)
            metrics: dict[str, Any] = {
                **acc, "pgd_steps": e.pgd.steps, "n_eval": record.n, "eps": eps, "cascade": e.cascade,
                "eval_time_s": round(sum(times.values()), 3), "time_s": times,
                "flags": report.flags, "warnings": report.messages,
                "ci95": interval_block(acc, record.n),   # Wilson 95 % bounds of every *_acc (pipeline_lib/stats.py)
            }
            if any(st.metric == "autoattack_acc" for st in steps):
                metrics["autoattack_after"] = autoattack_progress(record, steps, e.cascade)
            log.info("%s: %s; flags raised: %s", stage, ", ".join(f"{k}={v:.4f}" for k, v in acc.items()),
                     ", ".join(report.raised) or "none")

        write_json(out.metrics, metrics)
        record.write_csv(out.record, worst_case_columns(steps))
        plot_evaluation(out.plot, f"{stage}: {meta['arch']} on {p.data.dataset}, first {record.n} test images",
                        acc, curve, eps, report.raised)
        log_bytes = log_path.read_bytes()
        atomic_write(out.log, lambda fh: fh.write(log_bytes))

        tr.log_metrics({**metrics, **{f"flag_{k}": int(v) for k, v in report.flags.items()}})
        tr.set_tags({"sanity_flags": ",".join(report.raised) or "none"})
        for path in (out.metrics, out.record, out.log, out.plot):
            tr.log_artifact(path)
    shutil.rmtree(out.state_dir, ignore_errors=True)  # finished: the outputs supersede the resume state
    return metrics
