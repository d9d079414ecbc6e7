"""`arpipe aggregate` (the DVC stage) and `arpipe gate` (the CI metric-regression check)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING
from pathlib import Path

import typer
from rich.console import Console

from pipeline_lib.io import check_writable

if TYPE_CHECKING:
    from pipeline_lib.config import Params

from .common import PARAMS_OPTION, console, fail, load_or_exit


def aggregate(
    eval_dir: Path = typer.Option(..., help="folder of evaluate-stage metrics, <model>.json"),
    train_dir: Path | None = typer.Option(None, help="folder of training metrics, <model>.json (train time)"),
    corruption_dir: Path | None = typer.Option(None, help="folder of corruption metrics, <model>.json; blanks if absent"),
    record_dir: Path | None = typer.Option(None, help="folder of per-example records, <model>_record.csv: paired "
                                                      "comparisons and ARDist intervals"),
    table: Path = typer.Option(..., help="comparison table CSV to write (also DVC plot data)"),
    markdown: Path = typer.Option(..., help="comparison table Markdown to write"),
    summary: Path = typer.Option(..., help="summary metrics JSON to write (DVC metrics, gate input)"),
    plot: Path = typer.Option(..., help="accuracy-robustness tradeoff PNG to write"),
    comparisons_csv: Path | None = typer.Option(None, help="paired comparisons CSV to write (needs --record-dir)"),
    comparisons_md: Path | None = typer.Option(None, help="paired comparisons Markdown to write"),
    headline_dir: Path | None = typer.Option(None, help="folder to write <model>.json headline metrics to "
                                                         "(dvc.yaml's top-level metrics)"),
    history_plot: Path | None = typer.Option(None, help="PNG to write: every model's training history overlaid"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Compare every evaluated model: NRR, ARDist, intervals, paired comparisons, table, tradeoff plot, MLflow."""
    from pipeline_lib.aggregation.job import AggregateInputs, AggregateOutputs, run_aggregate
    from pipeline_lib.aggregation.metrics_io import MetricsError
    from pipeline_lib.aggregation.references import published_points

    p = load_or_exit(params)
    if (comparisons_csv is None) != (comparisons_md is None):
        raise fail("give both --comparisons-csv and --comparisons-md, or neither")
    check_writable(table, markdown, summary, plot,
                   *(f for f in (comparisons_csv, comparisons_md, history_plot) if f is not None))
    try:
        if p.aggregate.reference == "published":   # a broken shipped table should fail before any work
            published_points(p.aggregate.published_table, p.aggregate.reference_models, p.aggregate.published_sources)
        s = run_aggregate(p, AggregateInputs(eval_dir, train_dir, corruption_dir, record_dir),
                          AggregateOutputs(table, markdown, summary, plot, comparisons_csv, comparisons_md))
    except (MetricsError, ValueError) as exc:
        raise fail(str(exc)) from None
    publish_views(p, eval_dir, train_dir, corruption_dir, record_dir, summary, headline_dir, history_plot,
                  [table, markdown, summary, plot, comparisons_csv, comparisons_md], params)
    for row in s.rows:
        shown = {k: row.values[k] for k in ("clean", "robust", "ardist") if row.values[k] is not None}
        console.print(f"aggregate: {row.model:<14} " + "  ".join(f"{k}={v:.2f}" for k, v in shown.items()))
    console.print(f"aggregate: robust metric {s.robust_label()}; wrote {table}, {markdown}, {summary}, {plot}")


def publish_views(p: Params, eval_dir: Path, train_dir: Path | None, corruption_dir: Path | None,
                  record_dir: Path | None, summary: Path, headline_dir: Path | None, history_plot: Path | None,
                  written: list[Path | None], params: Path) -> None:
    """DVC's headline metrics and training overlay, then the MLflow comparison layout over every file."""
    from pipeline_lib.comparison_views import write_headline, write_history_overlay
    from pipeline_lib.tracking_layout import LayoutInputs, publish

    if headline_dir is not None:
        write_headline(summary, headline_dir, p.evaluate.models)
    if history_plot is not None and train_dir is not None:
        write_history_overlay(train_dir, p.evaluate.models, history_plot)
    files = [f for f in (*written, history_plot) if f is not None]
    publish(p, LayoutInputs(eval_dir, train_dir, corruption_dir, record_dir, summary, files), params)


def gate(
    baseline: Path = typer.Option(..., help="committed baseline summary JSON, e.g. baselines/ci.json"),
    current: Path = typer.Option(..., help="current aggregate summary JSON (or summary CSV)"),
    params: Path = PARAMS_OPTION,
    show_all: bool = typer.Option(False, "--all", help="list unchanged metrics too"),
    update: bool = typer.Option(False, "--update", help="write the current metrics as the new baseline"),
    profile: str | None = typer.Option(None, help="profile name recorded in the baseline on --update"),
    records: Path | None = typer.Option(None, help="the current run's per-example records (<model>_record.csv, "
                                                   "e.g. metrics/eval_detail): accuracies are gated paired against "
                                                   "the baseline's examples; with --update, stored in the baseline"),
) -> None:
    """Fail (exit 1) when a metric regressed (paired and significant, or beyond its tolerance) or disappeared;
    exit 2 on bad input."""
    from pipeline_lib.aggregation.gate import (GateInputError, check_context, compare, current_examples, failed,
                                               load_metrics, render, write_baseline)

    p = load_or_exit(params, registries=False)   # reads no model or method params
    out = Console(width=None if sys.stdout.isatty() else 140)   # CI logs are not terminals: do not wrap at 80
    try:
        cur = load_metrics(current)
        if records is not None:
            cur["examples"] = current_examples(cur, records)
        if update:
            check_writable(baseline)
            write_baseline(cur, baseline, profile, current, cur["examples"])
            out.print(f"wrote baseline {baseline} from {current}" +
                      (f" with the per-example records of {records}" if records is not None else ""))
            return
        base = load_metrics(baseline)
        check_context(base, cur)
    except GateInputError as exc:
        raise fail(str(exc)) from None
    if not base["examples"] or records is None:
        out.print("[yellow]no per-example records on " + ("the baseline" if not base["examples"] else "this run") +
                  " side: accuracies are gated by the fixed tolerances of aggregate.gate[/]")
    rows = compare(base, cur, p.aggregate.gate)
    table = render(rows, show_all)
    out.print(table if table.row_count else "no metric moved")
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "improved", "regressed", "missing", "new", "ignored")}
    out.print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" (of {len(rows)} metrics)")
    if counts["improved"]:
        out.print(f"[cyan]improvements beyond tolerance: if intended, refresh the baseline with[/] "
                  f"arpipe gate --update --baseline {baseline} --current {current}"
                  + (f" --records {records}" if records is not None else ""))
    if failed(rows):
        out.print("[bold red]gate FAILED[/]: metrics regressed or disappeared (see table)")
        raise typer.Exit(1)
    out.print("[green]gate passed[/]")
