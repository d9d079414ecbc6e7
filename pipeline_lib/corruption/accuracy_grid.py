"""Accuracy of a model on every corruption x severity of a corrupted set, and its summary.

Mean corruption accuracy = the mean over the averaged corruptions x 5 severities, each
cell weighted equally (RobustBench's corruptions_acc). The extra corruptions are reported
next to it, never in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluation.accuracy import predict
from ..stats import bootstrap_mean_interval, interval_block
from .config import SEVERITIES
from .store import CorruptedSet, CorruptedSetError


def correct_on(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
               device: torch.device) -> np.ndarray:
    """(N,) bool: top-1 right on each uint8 (N, H, W, C) image, in eval mode."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device).float().div_(255.0)   # (N, C, H, W) in [0, 1]
    pred = predict(model, x, batch_size).cpu()
    return (pred == torch.from_numpy(labels)).numpy()


def accuracy_on(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                device: torch.device) -> float:
    """Top-1 accuracy (fraction) on uint8 (N, H, W, C) images in eval mode."""
    return float(correct_on(model, images, labels, batch_size=batch_size, device=device).mean())


def corruption_table(model: nn.Module, cset: CorruptedSet, names: Sequence[str], n: int, *,
                     clean_labels: np.ndarray, batch_size: int, device: torch.device,
                     progress: bool = True, hits: dict[str, np.ndarray] | None = None) -> dict[str, list[float]]:
    """{corruption: [accuracy at severity 1, ..., 5]} on the first n images of each severity.

    `hits`, when given, receives {corruption: (n,) int} the number of severities each image is
    classified right at (the per-image outcome the corruption accuracy's bootstrap interval resamples).

    The set's labels must equal the clean test labels: a guard against evaluating
    corrupted images of a different subset, order or dataset.
    """
    table: dict[str, list[float]] = {}
    with tqdm(total=len(names) * len(SEVERITIES), desc="corruption", disable=not progress) as bar:
        for name in names:
            table[name] = []
            for s in SEVERITIES:
                x, y = cset.load(name, s, n)
                if not np.array_equal(y, clean_labels):
                    raise CorruptedSetError(f"labels of {name} severity {s} in {cset.folder} differ from the first "
                                            f"{n} test labels: the set was made from other images")
                right = correct_on(model, x, y, batch_size=batch_size, device=device)
                table[name].append(float(right.mean()))
                if hits is not None:
                    hits[name] = hits.get(name, np.zeros(n, dtype=np.int64)) + right
                bar.update()
    return table


def per_image_accuracy(hits: dict[str, np.ndarray], corruptions: Sequence[str]) -> np.ndarray:
    """(n,) each image's accuracy over the averaged corruptions x severities (its mean is mean_corruption_acc)."""
    main = [m for m in corruptions if m in hits]
    return np.sum([hits[m] for m in main], axis=0) / (len(main) * len(SEVERITIES))


def summarise(table: dict[str, list[float]], corruptions: Sequence[str], extra: Sequence[str],
              clean_acc: float, hits: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The metrics a `corruption@<model>` stage reports (accuracies as fractions).

    With `hits` (from corruption_table) also `ci95`: the Wilson interval of clean_acc and a percentile
    bootstrap over images of mean_corruption_acc (the cells share images: not a binomial count;
    pipeline_lib/stats.py says why)."""
    main = [m for m in corruptions if m in table]
    if not main:
        raise ValueError("no averaged corruption in the table")
    grid = np.array([table[m] for m in main])   # (corruptions, severities)
    out: dict[str, Any] = {
        "clean_acc": clean_acc,
        "mean_corruption_acc": float(grid.mean()),
        "mean_corruption_error": float(1.0 - grid.mean()),
        "per_corruption": {m: float(np.mean(table[m])) for m in main},
        "per_severity": {str(s): float(grid[:, i].mean()) for i, s in enumerate(SEVERITIES)},
        "table": {m: {str(s): table[m][i] for i, s in enumerate(SEVERITIES)} for m in main},
        "n_corruptions": len(main),
    }
    if hits is not None:
        n = len(next(iter(hits.values())))
        lo, hi = bootstrap_mean_interval(per_image_accuracy(hits, main))
        out["ci95"] = {**interval_block({"clean_acc": clean_acc}, n),
                       "mean_corruption_acc": {"lo": round(lo, 6), "hi": round(hi, 6)}}
    ext = [m for m in extra if m in table]
    if ext:
        out["mean_extra_acc"] = float(np.mean([table[m] for m in ext]))
        out["extra_per_corruption"] = {m: float(np.mean(table[m])) for m in ext}
        out["extra_table"] = {m: {str(s): table[m][i] for i, s in enumerate(SEVERITIES)} for m in ext}
    return out
