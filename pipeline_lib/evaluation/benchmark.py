"""Evaluate any classifier the way the `evaluate` stage does: `benchmark(model, ...)`.

`evaluate_model` is the one implementation both use (the stage adds files, MLflow and
resumption around it): plan the attack steps from the evaluate params, run the cascade
(checks: eval mode, logits; every adversarial batch inside the eps ball and [0, 1]), then
accuracies, the PGD-vs-eps curve and the gradient-masking flags, into the stage's metrics dict.

`benchmark` is the RobustBench-style entry point for a model from anywhere:

    from pipeline_lib.benchmark import benchmark
    result = benchmark(model.eval(), dataset="cifar10", eps=8 / 255, n_eval=1000, data_root="data")
    result.metrics["autoattack_acc"], result.record.robust([...]), result.report.raised

The model takes images in [0, 1] (its normalisation inside), is in eval mode and returns
logits; inputs are either given (x (N, C, H, W) float in [0, 1], y (N,)) or the first
n_eval test images of `dataset` (only the test split is needed on disk).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import get_spec, load_test
from ..stats import interval_block
from .cascade import run_cascade
from .config import EvaluateParams, check_against
from .record import EvalRecord
from .registry import AttackEnv, AttackStep, attack_metrics, plan_steps, sweep_metric
from .sanity import SanityReport, sanity_report
from .record_metrics import accuracies, autoattack_progress, step_times

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    record: EvalRecord                   # per example and step: broken / attempted (see evaluation.record)
    steps: list[AttackStep]
    accuracies: dict[str, float]         # clean_acc, <attack>_acc, worst_case_acc (fractions)
    curve: list[tuple[float, float]]     # (eps, PGD accuracy) points, eps 0 = clean
    report: SanityReport                 # gradient-masking flags
    metrics: dict[str, Any]              # what the stage writes as metrics JSON


def eps_curve(acc: Mapping[str, float], e: EvaluateParams, eps: float) -> list[tuple[float, float]]:
    """(eps, PGD accuracy) points: clean at 0, the sweep, and threat.eps when pgd_acc is independent."""
    pts = [(0.0, acc["clean_acc"])] + [(v, acc[sweep_metric(v)]) for v in e.eps_sweep]
    if "pgd_acc" in acc and not e.cascade:
        pts.append((eps, acc["pgd_acc"]))
    return sorted(pts)


def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, e: EvaluateParams, *, eps: float, num_classes: int,
                   device: torch.device, state_path: str | Path | None = None,
                   fingerprint: Callable[[list[AttackStep]], str] | None = None, progress: bool = False,
                   desc: str = "evaluate", steps: list[AttackStep] | None = None) -> Evaluation:
    """Every attack of `e` on x (N, C, H, W) in [0, 1], y (N,) (on `device`, like the model).

    state_path / fingerprint(steps): resumable state as in `run_cascade` (the stage's).
    steps: the plan of `e` when the caller already made it (the stage keys its MLflow run by it)."""
    if steps is None:
        steps = plan_steps(e, AttackEnv(model, eps, device, e.seed, e.batch_size))
    log.info("%s: first %d test images, eps=%g, steps: %s", desc, len(y), eps, ", ".join(st.name for st in steps))
    record = run_cascade(model, x, y, steps, batch_size=e.batch_size, seed=e.seed, cascade=e.cascade,
                         num_classes=num_classes, state_path=state_path,
                         fingerprint=fingerprint(steps) if fingerprint else "", progress=progress, desc=desc)
    acc = accuracies(record, steps, e.cascade)
    curve = eps_curve(acc, e, eps)
    attack_acc = {m.key: acc[m.eval_key] for m in attack_metrics() if m.eval_key in acc}
    report = sanity_report(attack_acc, curve, tol=e.sanity_tolerance, compare_attacks=not e.cascade)
    for message in report.messages:
        log.warning("%s: SANITY FLAG: %s", desc, message)
    times = step_times(record, steps)
    metrics: dict[str, Any] = {
        **acc, "pgd_steps": e.pgd.steps, "n_eval": record.n, "eps": eps, "cascade": e.cascade,
        "eval_time_s": round(sum(times.values()), 3), "time_s": times,
        "flags": report.flags, "warnings": report.messages,
        "ci95": interval_block(acc, record.n),   # Wilson 95 % bounds of every *_acc (pipeline_lib/stats.py)
    }
    if any(st.metric == "autoattack_acc" for st in steps):
        metrics["autoattack_after"] = autoattack_progress(record, steps, e.cascade)
    log.info("%s: %s; flags raised: %s", desc, ", ".join(f"{k}={v:.4f}" for k, v in acc.items()),
             ", ".join(report.raised) or "none")
    return Evaluation(record, steps, acc, curve, report, metrics)


def default_evaluate(eps: float, n_eval: int) -> dict[str, Any]:
    """The publishable evaluation: FGSM, PGD-20 and CW-20 (step eps/4), standard AutoAttack."""
    return {"models": ["model"], "n_eval": n_eval, "batch_size": 500, "seed": 0,
            "attacks": ["fgsm", "pgd", "cw", "autoattack"], "pgd": {"steps": 20, "step_size": eps / 4},
            "autoattack": {"version": "standard"}}


def benchmark(model: nn.Module, x: Tensor | None = None, y: Tensor | None = None, *, dataset: str, eps: float,
              n_eval: int | None = None, evaluate: EvaluateParams | Mapping[str, Any] | None = None,
              data_root: str | Path = "data", download: bool = False, progress: bool = False) -> Evaluation:
    """Evaluate `model` (eval mode, logits, inputs in [0, 1]) as the evaluate stage would.

    x, y: the images (float in [0, 1]) and labels to attack; None: the first n_eval test
    images of `dataset` under data_root. evaluate: EvaluateParams, or a mapping of evaluate
    keys overriding `default_evaluate` (e.g. {"attacks": ["autoattack"]}). The model stays
    on its device; the inputs are moved there.
    """
    spec = get_spec(dataset)
    if (x is None) != (y is None):
        raise ValueError("give both x and y, or neither (then the test split of `dataset` is used)")
    n = n_eval if n_eval is not None else (len(x) if x is not None else 1000)
    if isinstance(evaluate, EvaluateParams):
        e = evaluate
    else:
        e = EvaluateParams.model_validate({**default_evaluate(eps, n), **dict(evaluate or {})})
    check_against(e, dataset=dataset, num_classes=spec.num_classes, eps=eps)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if x is None:
        images, labels = load_test(dataset, data_root, n, download)
        x, y = images.float().div_(255), labels
    assert y is not None
    expected = (spec.channels, spec.image_size, spec.image_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"x must be (N, {', '.join(map(str, expected))}) images of {dataset}, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64) or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("x must be float images in [0, 1] (the model normalises inside)")
    x, y = x[:n].float().to(device), y[:n].long().to(device)
    return evaluate_model(model, x, y, e, eps=eps, num_classes=spec.num_classes, device=device,
                          progress=progress, desc=f"benchmark {dataset}")
