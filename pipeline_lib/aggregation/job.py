"""The `aggregate` stage's work: collect every model's metrics, compute NRR / ARDist / sweep gaps,
write the table (CSV, Markdown), the summary JSON and the tradeoff plot, and mirror it all to MLflow
as the stage run `aggregate` (the per-model runs are tracking_layout.py's, built by the stage command)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Params
from ..tracking import Tracker
from .metrics_io import ModelMetrics, collect_metrics
from .plot import write_tradeoff_plot
from .records import Correctness, load_correctness
from .rows import Replicate, Summary, build_summary
from .table import write_comparisons, write_csv, write_markdown, write_summary_json


@dataclass(frozen=True)
class AggregateInputs:
    """Folders of per-model metrics JSON (named in dvc.yaml). corruption may not exist yet."""

    eval_dir: Path
    train_dir: Path | None = None
    corruption_dir: Path | None = None
    record_dir: Path | None = None   # <model>_record.csv per-example records: paired statistics


@dataclass(frozen=True)
class AggregateOutputs:
    table_csv: Path
    table_md: Path
    summary_json: Path
    plot_png: Path
    comparisons_csv: Path | None = None
    comparisons_md: Path | None = None


def objectives(p: Params) -> dict[str, str]:
    """Model name -> objective (sweeps group instances of one objective); 'standard' is its own."""
    return {name: spec.objective or name for name, spec in p.method.items()}


def _correctness(models: list[ModelMetrics], record_dir: Path | None) -> dict[str, Correctness]:
    if record_dir is None:
        return {}
    return load_correctness([m.name for m in models], record_dir, {m.name: m.acc for m in models},
                            {m.name: m.cascade for m in models})


def _replicate(p: Params, seed: int, inputs: AggregateInputs) -> Replicate:
    """Replicate `seed`'s metrics from the seed<k> folders its *_rep stages write."""
    sub = f"seed{seed}"
    models = collect_metrics(p.evaluate.models, objectives(p), inputs.eval_dir / sub, None,
                             None if inputs.corruption_dir is None else inputs.corruption_dir / sub)
    return Replicate(seed, models, _correctness(models, None if inputs.record_dir is None else inputs.record_dir / sub))


def run_aggregate(p: Params, inputs: AggregateInputs, outputs: AggregateOutputs) -> Summary:
    models = collect_metrics(p.evaluate.models, objectives(p), inputs.eval_dir, inputs.train_dir,
                             inputs.corruption_dir)
    correctness = _correctness(models, inputs.record_dir)
    replicates = [_replicate(p, seed, inputs) for seed in p.replicates]
    summary = build_summary(models, p.aggregate, dataset=p.data.dataset, arch=p.model.arch, correctness=correctness,
                            replicates=replicates, seed=p.seed)
    write_csv(summary, outputs.table_csv)
    if outputs.comparisons_csv is not None and outputs.comparisons_md is not None:
        write_comparisons(summary.comparisons, outputs.comparisons_csv, outputs.comparisons_md)
    write_markdown(summary, outputs.table_md)
    write_summary_json(summary, outputs.summary_json)
    write_tradeoff_plot(summary, outputs.plot_png)
    _log_mlflow(p, summary, outputs)
    return summary


def _log_mlflow(p: Params, s: Summary, outputs: AggregateOutputs) -> None:
    """The stage's run: its settings, sweep gaps, paired differences and artifacts."""
    with Tracker(p.mlflow.experiment, "aggregate", tags={"stage": "aggregate", "dvc_stage": "aggregate"}) as tr:
        tr.log_params({"aggregate": p.aggregate.model_dump(exclude={"gate"}), "models": p.evaluate.models,
                       "robust_metric_used": s.robust_metric or "per model",
                       "reference_curve": s.curve.describe() if s.curve else s.curve_error})
        tr.log_metrics({f"mean_gap.{sw.objective}": sw.mean_gap for sw in s.sweeps if sw.mean_gap is not None})
        tr.log_metrics({f"diff.{c.model}.{c.baseline}.{c.metric}": {"value": c.diff, "lo": c.lo, "hi": c.hi,
                                                                   "p_holm": c.p_holm} for c in s.comparisons})
        for path in (outputs.table_csv, outputs.table_md, outputs.summary_json, outputs.plot_png,
                     outputs.comparisons_csv, outputs.comparisons_md):
            if path is None:
                continue
            tr.log_artifact(path, artifact_path="aggregate")
