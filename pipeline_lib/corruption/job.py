"""The `corruption@<model>` stage's work: accuracy table, summary metrics and heatmap of one checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..config import DataParams, RuntimeParams
from ..data import load_test
from ..io import write_json
from ..run_setup import start_run
from .accuracy_grid import accuracy_on, corruption_table, summarise
from .config import CorruptionParams
from .heatmap import plot_heatmap
from .store import CorruptedSetError, open_set


def run_corruption_eval(name: str, model_path: Path, set_dir: Path, metrics_path: Path, heatmap_path: Path, *,
                        corruption: CorruptionParams, data: DataParams, runtime: RuntimeParams, experiment: str,
                        allow_name_mismatch: bool = False) -> dict[str, Any]:
    """Evaluate the checkpoint at `model_path` as model `name` on the corrupted set in `set_dir`.

    The params it reads: `corruption`, `data`, `runtime` and `mlflow.experiment`."""
    stage = f"corruption@{name}"
    run = start_run(stage, name, runtime, experiment=experiment)
    device = run.device
    cset, manifest = open_set(set_dir)
    dataset = data.dataset
    if manifest["dataset"] != dataset:
        raise CorruptedSetError(f"{set_dir} holds corrupted {manifest['dataset']} images but data.dataset is "
                                f"{dataset!r}: run the corrupt stage again")
    model, _ = checkpoint.load_for_run(model_path, device, dataset=dataset, name=name,
                                       allow_name_mismatch=allow_name_mismatch)
    n = int(manifest["n_images"])
    x, y = load_test(dataset, data.root, n, data.download)
    batch_size = corruption.batch_size
    with run.tracker() as tr:
        tr.log_params({"corruption": corruption.model_dump(), "source": manifest["source"],
                       "checkpoint": str(model_path)})
        t0 = time.perf_counter()
        labels = y.numpy()
        clean_acc = accuracy_on(model, x.permute(0, 2, 3, 1).numpy(), labels, batch_size=batch_size, device=device)
        names = [*manifest["corruptions"], *manifest["extra"]]
        hits: dict[str, Any] = {}
        table = corruption_table(model, cset, names, n, clean_labels=labels, batch_size=batch_size,
                                 device=device, progress=runtime.progress, hits=hits)
        metrics = summarise(table, manifest["corruptions"], manifest["extra"], clean_acc, hits)
        metrics.update(n_eval=n, eval_time_s=round(time.perf_counter() - t0, 3))
        write_json(metrics_path, metrics)
        plot_heatmap(table, heatmap_path, extra=manifest["extra"],
                     title=f"{name} on {manifest['source']} corrupted {dataset} (n={n}): clean "
                           f"{100 * clean_acc:.1f}%, mean corruption {100 * metrics['mean_corruption_acc']:.1f}%")
        tr.log_metrics(metrics)
        tr.log_artifact(metrics_path)
        tr.log_artifact(heatmap_path)
    return metrics
