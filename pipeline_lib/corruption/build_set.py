"""The `corrupt` stage's work: make (generated) or locate (released) the corrupted test set, once.

Output folder (a DVC output, cached):

    <out>/<corruption>.npy, labels.npy   generated sets, in the CIFAR-C layout (store.py)
    <out>/manifest.json                  always: source, where the arrays are, n, names, skipped ones

A released set stays where `cifar_c.ensure_released` extracted it (under data.root,
~2.9 GB for CIFAR-10-C); the manifest points at it instead of copying it into the DVC cache.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataParams, RuntimeParams
from ..data import DataUnavailableError, get_spec, load_test
from ..run_setup import start_run
from .cifar_c import IMAGES_PER_SEVERITY, ensure_released, released
from .config import ALL, CorruptionParams
from .generate import generate
from .ops import CORRUPTIONS
from .samples import sample_grid
from .store import CorruptedSet, CorruptedSetError, write_manifest, write_set

log = logging.getLogger(__name__)


def check_source(cp: CorruptionParams, dataset: str) -> None:
    """Cross-check the corruption section against the dataset before any work."""
    if cp.source == "released":
        spec = released(dataset)   # ValueError naming the datasets that have one
        if cp.n_images > IMAGES_PER_SEVERITY:
            raise ValueError(f"corruption.n_images={cp.n_images} exceeds the {IMAGES_PER_SEVERITY} images per "
                             f"severity of {spec.folder}")
    elif cp.n_images > get_spec(dataset).test_size:
        raise ValueError(f"corruption.n_images={cp.n_images} exceeds the {get_spec(dataset).test_size} test "
                         f"images of {dataset}")


def _nhwc(images: Any) -> np.ndarray:
    """uint8 (N, C, H, W) torch tensor -> uint8 (N, H, W, C) numpy array (the CIFAR-C layout)."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def build_corrupted_set(out_dir: Path, samples_path: Path, *, corruption: CorruptionParams, data: DataParams,
                        runtime: RuntimeParams, experiment: str) -> dict[str, Any]:
    """Write the corrupted set (or its manifest) to `out_dir` and a sample grid PNG; returns the manifest.

    The params it reads: `corruption`, `data`, `runtime` and `mlflow.experiment`."""
    cp, dataset = corruption, data.dataset
    check_source(cp, dataset)
    run = start_run("corrupt", None, runtime, experiment=experiment)
    out_dir.mkdir(parents=True, exist_ok=True)
    with run.tracker() as tr:
        tr.log_params({"corruption": cp.model_dump(), "dataset": dataset})
        t0 = time.perf_counter()
        clean: np.ndarray | None = None
        if cp.source == "generated":
            x, y = load_test(dataset, data.root, cp.n_images, data.download)
            clean = _nhwc(x)
            made = generate(clean, cp.names, seed=cp.seed, progress=runtime.progress)
            for stale in out_dir.glob("*.npy"):   # names dropped from the params since the last run
                if stale.stem in ALL and stale.stem not in made.arrays:
                    stale.unlink()
            write_set(out_dir, made.arrays, y.numpy())
            data_dir, skipped, n = ".", made.skipped, cp.n_images
        else:
            folder = ensure_released(dataset, data.root, cp.download)
            present = CorruptedSet(folder).names
            missing = [m for m in cp.names if m not in present]
            if missing:
                raise CorruptedSetError(f"{folder} lacks {missing}; it holds {present}")
            data_dir, skipped, n = os.path.relpath(folder, out_dir), {}, cp.n_images
        made_names = [m for m in cp.names if m not in skipped]
        manifest = {
            "dataset": dataset, "source": cp.source, "data_dir": data_dir, "n_images": n,
            "corruptions": [m for m in cp.corruptions if m in made_names],
            "extra": [m for m in cp.extra if m in made_names],
            "skipped": skipped, "seed": cp.seed if cp.source == "generated" else None,
            "differs_from_released": ({m: CORRUPTIONS.get(m).differs for m in made_names
                                       if CORRUPTIONS.get(m).differs} if cp.source == "generated" else {}),
        }
        if cp.source == "released":
            manifest["archive_md5"] = released(dataset).md5
        write_manifest(out_dir, manifest)   # last: its presence means the arrays are complete
        build_s = time.perf_counter() - t0
        if clean is None:
            try:
                clean = _nhwc(load_test(dataset, data.root, 1, data.download)[0])
            except DataUnavailableError as exc:
                log.warning("sample grid without the clean column: %s", exc)
        cset = CorruptedSet(out_dir / data_dir)
        sample_grid(cset, made_names, samples_path, index=0, clean=None if clean is None else clean[0],
                    title=f"{dataset} test image 0: {cp.source} corruptions")
        tr.log_metrics({"build_time_s": build_s, "n_images": n, "n_corruptions": len(made_names)})
        tr.set_tags({"skipped": ",".join(skipped) or "none"})
        tr.log_artifact(out_dir / "manifest.json")
        tr.log_artifact(samples_path)
    return {**manifest, "build_time_s": round(build_s, 3)}

