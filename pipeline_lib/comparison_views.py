"""Files for DVC's own views, written by the aggregate stage next to its summary.

- `<headline dir>/<model>.json`: a few headline numbers per model (dvc.yaml's top-level `metrics:`),
  so `dvc metrics show` prints one short row per model instead of every stage's every key
  (those files stay reachable by path: `dvc metrics show metrics/eval`).
- the training histories of every model overlaid in one PNG (`dvc plots show` renders images
  offline; its vega charts load their library from a CDN).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from .io import atomic_path, write_json

# Headline columns of summary.json's per-model rows (percent; absent ones are left out).
HEADLINE = ("clean", "robust", "ardist", "corruption")


def write_headline(summary_json: Path, out_dir: Path, models: Sequence[str]) -> list[Path]:
    """One `<model>.json` per model: HEADLINE values and the robust accuracy's 95 % bounds."""
    summary = json.loads(summary_json.read_text(encoding="utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for m in models:
        row = summary.get("models", {}).get(m, {})
        data = {k: row[k] for k in HEADLINE if k in row}
        bounds = summary.get("ci95", {}).get(m, {}).get("robust")
        if bounds:
            data.update(robust_lo=bounds["lo"], robust_hi=bounds["hi"])
        path = out_dir / f"{m}.json"
        write_json(path, data)
        written.append(path)
    for stale in out_dir.glob("*.json"):   # a model dropped from evaluate.models leaves no stale row
        if stale not in written:
            stale.unlink()
    return written


def _read_history(path: Path) -> list[dict[str, float]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]


def write_history_overlay(train_dir: Path, models: Sequence[str], out_png: Path) -> bool:
    """Validation clean accuracy and training loss by epoch, one line per model (the histories
    `<train_dir>/<model>_history.csv` that exist). False when none exists (nothing written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {m: _read_history(train_dir / f"{m}_history.csv") for m in models
                 if (train_dir / f"{m}_history.csv").is_file()}
    if not histories:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, rows in histories.items():
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [100 * r.get("val_clean_acc", float("nan")) for r in rows], marker="o", label=m)
        axes[1].plot(epochs, [r.get("train_loss", float("nan")) for r in rows], marker="o", label=m)
    axes[0].set(xlabel="epoch", ylabel="validation clean accuracy (%)", title="Validation clean accuracy")
    axes[1].set(xlabel="epoch", ylabel="training loss (each method's own objective)", title="Training loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    fig.suptitle("Training histories (standard: pretraining; the others: finetuning)")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True
