"""MLflow laid out for comparison: one parent run per pipeline execution, one child run per model.

    <execution>              tags: git_commit, dvc_exp_name, profile, dataset, arch, arpipe.execution
    |                        params: every param of the execution (runtime excluded)
    |                        metrics: <model>/<headline> (clean, robust, ardist, nrr_*, ...), sweep gaps
    |                        artifacts: aggregate/ (table, summary, tradeoff plot, training overlay)
    +-- <model> ...          params: the model's resolved hyperparameters (method params, optim,
                             attack, data, arch, seed); metrics: headline numbers and their 95 %
                             bounds (<m>_lo/_hi), eval/* and corruption/* accuracies with ci95 bounds,
                             train/* curves by epoch; artifacts under the same names for every model
                             (ARTIFACTS below, the checkpoint too when it is small)

One pipeline execution is keyed by `execution_key`: the DVC experiment name (DVC_EXP_NAME, set
by `dvc exp run`, queued or not) when there is one, else the git commit plus a hash of the
params (runtime settings excluded: they do not change what is computed). The aggregate stage
builds the layout from the files it reads; running it again (or after a resumed stage) finds
the runs by their tags and updates them: params it holds are kept, metrics are logged only when
their value changed, curves only at epochs not held yet, artifacts are overwritten.

Failures follow tracking.py's rule: one warning, the stage's outputs are unaffected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Params
from .profiles import generated_from
from .tracking import first_line, flatten, git_commit, default_tracking_uri, ensure_experiment, quiet_mlflow

log = logging.getLogger(__name__)

EXECUTION_TAG = "arpipe.execution"   # the execution key (module docstring)
ROLE_TAG = "arpipe.role"             # "execution" (parent) | "model" (child)
MODEL_TAG = "arpipe.model"
# Checkpoints up to this size are logged to their model run (the default small CNN: ~0.5 MB each);
# paper-scale ones (ResNet-18 ~45 MB, WRN-34-10 ~185 MB) stay in DVC's cache only.
CHECKPOINT_MAX_BYTES = 50 * 2**20
# MLflow's log_batch limits (per call): 100 params, 1000 metrics.
PARAMS_PER_CALL, METRICS_PER_CALL = 100, 1000


def execution_key(p: Params) -> str:
    """What identifies one pipeline execution (module docstring)."""
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return f"exp:{name}"
    blob = json.dumps(p.model_dump(mode="json", exclude={"runtime"}), sort_keys=True).encode()
    return f"{git_commit()[:12]}-{hashlib.sha256(blob).hexdigest()[:12]}"


def profile_name(params_file: Path = Path("params.yaml")) -> str:
    """The profile named by `arpipe profile`'s header of params.yaml; 'default' for the hand-edited
    file (or one Hydra composed for `dvc exp run -S profile=...`, which writes no header)."""
    try:
        with open(params_file, encoding="utf-8") as fh:
            first = fh.readline()
    except OSError:
        return "unknown"
    names = generated_from(first)
    return " ".join(names) if names else "default"


# Artifact name in every model run -> file name pattern in its folder ({m}: the model).
ARTIFACTS: dict[str, tuple[str, str]] = {
    "eval/metrics.json": ("eval", "{m}.json"),
    "eval/plot.png": ("record", "{m}.png"),
    "eval/record.csv": ("record", "{m}_record.csv"),
    "eval/log.txt": ("record", "{m}.log"),
    "train/metrics.json": ("train", "{m}.json"),
    "train/history.csv": ("train", "{m}_history.csv"),
    "corruption/metrics.json": ("corruption", "{m}.json"),
    "corruption/heatmap.png": ("corruption", "{m}_heatmap.png"),
    "checkpoint/model.pt": ("models", "{m}.pt"),
}


@dataclass(frozen=True)
class LayoutInputs:
    """The folders the aggregate stage reads (None: not given) and its own outputs."""

    eval_dir: Path
    train_dir: Path | None
    corruption_dir: Path | None
    record_dir: Path | None
    summary_json: Path
    aggregate_files: list[Path] = field(default_factory=list)
    models_dir: Path = Path("models")   # dvc.yaml's ${models}: the checkpoints

    def model_files(self, m: str) -> dict[str, Path]:
        """Artifact name -> existing file of model `m`."""
        dirs = {"eval": self.eval_dir, "train": self.train_dir, "corruption": self.corruption_dir,
                "record": self.record_dir, "models": self.models_dir}
        out = {}
        for name, (folder, pattern) in ARTIFACTS.items():
            base = dirs[folder]
            path = None if base is None else base / pattern.format(m=m)
            if path is None or not path.is_file():
                continue
            if name.startswith("checkpoint/") and path.stat().st_size > CHECKPOINT_MAX_BYTES:
                continue
            out[name] = path
        return out


def hyperparameters(p: Params, model: str) -> dict[str, Any]:
    """The settings that made `model`: a finetune instance's resolved method (objective, init,
    method params, optim, attack), the pretraining's for 'standard', an import's provenance."""
    common = {"seed": p.seed, "data": p.data.model_dump(mode="json", exclude={"root", "download"}),
              "model": p.model.model_dump(mode="json"), "threat.eps": p.threat.eps}
    if model in p.method:   # the job the finetune stage builds, so the logged settings are the trained ones
        from .training.spec import finetune_job

        job = finetune_job(model, p.method[model], p.finetune.optim, p.threat)
        return {**common, "name": job.name, "objective": job.objective, "init": job.init,
                "params": job.objective_params.model_dump(mode="json"), "optim": job.optim.model_dump(mode="json"),
                "attack": job.attack.model_dump(mode="json")}
    if model == "standard":
        attack = {"eps": p.threat.eps, "step_size": p.threat.train_step_size, "steps": p.threat.train_steps}
        return {**common, "name": "standard", "objective": "standard", "init": "scratch",
                "optim": p.pretrain.optim.model_dump(mode="json"), "attack": attack}
    if model in p.external:
        return {"name": model, "objective": "external", "external": p.external[model].model_dump(mode="json")}
    return {"name": model}


def _numbers(d: Mapping[str, Any], prefix: str, skip: Iterable[str] = ()) -> dict[str, float]:
    """Numeric leaves of `d` (bools and `skip`ped top-level keys left out), named prefix + dotted path."""
    skipped = set(skip)
    return {f"{prefix}{k}": float(v) for k, v in flatten({k: v for k, v in d.items() if k not in skipped}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _read_json(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _history(path: Path | None) -> list[dict[str, float]]:
    import csv

    if path is None or not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        try:
            out.append({k: float(v) for k, v in row.items() if v not in (None, "")})
        except ValueError:
            continue
    return out


def model_metrics(m: str, summary: Mapping[str, Any], files: Mapping[str, Path]) -> dict[str, float]:
    """A model run's scalar metrics: the summary's headline numbers (percent) with their 95 % bounds,
    then the evaluate and corruption stages' accuracies (fractions) with their ci95 bounds."""
    row = summary.get("models", {}).get(m, {})
    out = _numbers(row, "")
    for col, bounds in summary.get("ci95", {}).get(m, {}).items():
        out.update({f"{col}_{b}": float(v) for b, v in bounds.items() if isinstance(v, int | float)})
    ev = _read_json(files.get("eval/metrics.json"))
    out.update(_numbers(ev, "eval/", skip=("flags", "time_s", "cascade", "warnings")))
    cor = _read_json(files.get("corruption/metrics.json"))
    out.update(_numbers(cor, "corruption/", skip=("table", "extra_table", "per_severity")))
    return out


class _Store:
    """The MLflow client calls of the layout: find-or-create by tags, log only what changed."""

    def __init__(self, experiment: str) -> None:
        quiet_mlflow()
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = default_tracking_uri()
        self.client = MlflowClient(uri)
        mlflow.set_tracking_uri(uri)
        self.experiment_id = ensure_experiment(mlflow, experiment)

    def run(self, tags: Mapping[str, str], name: str, parent: str | None = None) -> str:
        """The id of the run holding the key tags `tags` (created when absent)."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = self.client.search_runs([self.experiment_id], query, max_results=2,
                                        order_by=["attributes.start_time ASC"])
        if found:
            return str(found[0].info.run_id)
        extra = {"mlflow.parentRunId": parent} if parent else {}
        return str(self.client.create_run(self.experiment_id, tags={**tags, **extra}, run_name=name).info.run_id)

    def update(self, run_id: str, params: Mapping[str, Any], metrics: Mapping[str, float],
               tags: Mapping[str, str], curves: list[dict[str, float]] | None = None,
               artifacts: Mapping[str, Path] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.time import get_current_time_millis

        data = self.client.get_run(run_id).data
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        changed = sorted(k for k, v in flat.items() if k in data.params and data.params[k] != v)
        if changed:   # MLflow refuses to change a param: the run keeps the first values and says so
            log.warning("MLflow run %s keeps its earlier values of %s", run_id, ", ".join(changed[:5]))
        new_params = [Param(k, v) for k, v in flat.items() if k not in data.params]
        now = get_current_time_millis()
        new_metrics = [Metric(k, v, now, 0) for k, v in metrics.items() if data.metrics.get(k) != v]
        for key in sorted({k for rec in curves or [] for k in rec if k != "epoch"}):
            held = {h.step for h in self.client.get_metric_history(run_id, f"train/{key}")}
            new_metrics += [Metric(f"train/{key}", rec[key], now, int(rec["epoch"]))
                            for rec in curves or [] if key in rec and int(rec["epoch"]) not in held]
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        for i in range(0, len(new_params), PARAMS_PER_CALL):
            self.client.log_batch(run_id, params=new_params[i:i + PARAMS_PER_CALL])
        for i in range(0, len(new_metrics), METRICS_PER_CALL):
            self.client.log_batch(run_id, metrics=new_metrics[i:i + METRICS_PER_CALL])
        with tempfile.TemporaryDirectory() as tmp:   # the same artifact names for every model
            for name, path in (artifacts or {}).items():
                folder, _, base = name.rpartition("/")
                target = Path(tmp) / folder / base
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                self.client.log_artifact(run_id, str(target), artifact_path=folder or None)
        self.client.set_terminated(run_id, "FINISHED")


def publish(p: Params, inputs: LayoutInputs, params_file: Path = Path("params.yaml")) -> str | None:
    """Build or update the execution's parent run and its model runs; the parent's id (None when
    MLflow is off or failed: one warning, nothing else is affected)."""
    if os.environ.get("ARPIPE_MLFLOW", "1") == "0":
        return None
    try:
        return _publish(p, inputs, params_file)
    except Exception as exc:  # noqa: BLE001 - MLflow mirrors the outputs; it never fails the stage
        log.warning("MLflow comparison layout failed (%s); the aggregate outputs are written", first_line(exc))
        return None


def _publish(p: Params, inputs: LayoutInputs, params_file: Path) -> str:
    store = _Store(p.mlflow.experiment)
    key = execution_key(p)
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    profile = profile_name(params_file)
    commit = git_commit()
    context = {"git_commit": commit, "dvc_exp_name": exp_name or "none", "profile": profile,
               "dataset": p.data.dataset, "arch": p.model.arch}
    summary = _read_json(inputs.summary_json)
    parent = store.run({EXECUTION_TAG: key, ROLE_TAG: "execution"},
                       exp_name or f"pipeline {profile} {commit[:7]}")
    headline = {f"{m}/{k}": v for m in p.evaluate.models for k, v in _numbers(summary.get("models", {}).get(m, {}),
                                                                              "").items()}
    sweeps = summary.get("sweeps", {})   # {objective: {"mean_gap": value}}
    gaps = {f"mean_gap/{objective}": sw["mean_gap"] for objective, sw in sweeps.items()
            if isinstance(sw, dict) and isinstance(sw.get("mean_gap"), int | float)} if isinstance(sweeps, dict) else {}
    store.update(parent, p.model_dump(mode="json", exclude={"runtime"}), {**headline, **gaps},
                 {**context, "stage": "pipeline"},
                 artifacts={f"aggregate/{f.name}": f for f in inputs.aggregate_files if f.is_file()})
    for m in p.evaluate.models:
        files = inputs.model_files(m)
        hp = hyperparameters(p, m)
        run = store.run({EXECUTION_TAG: key, ROLE_TAG: "model", MODEL_TAG: m}, m, parent=parent)
        store.update(run, hp, model_metrics(m, summary, files),
                     {**context, "method": m, "objective": str(hp.get("objective", m)), "stage": "model"},
                     curves=_history(files.get("train/history.csv")), artifacts=files)
    return parent
