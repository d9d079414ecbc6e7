"""The `corruption@<model>` stage's work: accuracy table, summary metrics and heatmap of one checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..config import Params
from ..data import load_test
from ..io import write_json
from ..runtime import configure_determinism, resolve_device
from ..tracking import Tracker
from .evaluate import accuracy_on, corruption_table, summarise
from .heatmap import plot_heatmap
from .store import CorruptedSetError, open_set


def run_corruption_eval(p: Params, name: str, model_path: Path, set_dir: Path, metrics_path: Path,
                        heatmap_path: Path, *, allow_name_mismatch: bool = False) -> dict[str, Any]:
    configure_determinism(p.runtime.deterministic)
    device = resolve_device(p.runtime.device)
    cset, manifest = open_set(set_dir)
    dataset = p.data.dataset
    if manifest["dataset"] != dataset:
        raise CorruptedSetError(f"{set_dir} holds corrupted {manifest['dataset']} images but data.dataset is "
                                f"{dataset!r}: run the corrupt stage again")
    model, meta = checkpoint.load_model(model_path, device)
    checkpoint.check_model_name(meta, name, model_path, allow=allow_name_mismatch)
    if meta["dataset"] != dataset:
        raise checkpoint.CheckpointError(f"{model_path} was trained on {meta['dataset']}, not "
                                         f"data.dataset={dataset!r}")
    n = int(manifest["n_images"])
    x, y = load_test(dataset, p.data.root, n, p.data.download)
    stage = f"corruption@{name}"
    with Tracker(p.mlflow.experiment, stage, tags={"stage": "corruption", "method": name, "dvc_stage": stage}) as tr:
        tr.log_params({"corruption": p.corruption.model_dump(), "source": manifest["source"],
                       "checkpoint": str(model_path)})
        t0 = time.perf_counter()
        labels = y.numpy()
        clean_acc = accuracy_on(model, x.permute(0, 2, 3, 1).numpy(), labels, batch_size=p.corruption.batch_size,
                                device=device)
        names = [*manifest["corruptions"], *manifest["extra"]]
        hits: dict[str, Any] = {}
        table = corruption_table(model, cset, names, n, clean_labels=labels, batch_size=p.corruption.batch_size,
                                 device=device, progress=p.runtime.progress, hits=hits)
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
