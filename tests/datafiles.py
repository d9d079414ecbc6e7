"""Small dataset files in the published formats, written by tests and read by the real loaders.

* idx (MNIST family): magic 0x00000803 (uint8, 3 dims) / 0x00000801 (uint8, 1 dim),
  then the dims as big-endian uint32, then the raw bytes; optionally gzipped.
* CIFAR python batches: pickled dicts with 'data' (N, 3072) uint8 rows in CHW order
  and 'labels' (CIFAR-10) or 'fine_labels' + 'coarse_labels' (CIFAR-100).

The images are learnable: class c lights up a horizontal band, so a tiny model
trained for a few steps on them is accurate, which the training tests rely on.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline_lib.config import Params, parse_params
from pipeline_lib.data.sources import CIFAR, FASHION_FILES
from pipeline_lib.profiles import compose, deep_merge

REPO = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding of a uint8 array: 0x0000 | 0x08 | ndim, big-endian dims, data."""
    if array.dtype != np.uint8:
        raise TypeError(f"idx writer handles uint8 only, got {array.dtype}")
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def banded_images(n: int, channels: int, size: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, C, H, W), labels int (N,)): low noise plus a bright band at a class-dependent row."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    images = rng.integers(0, 70, (n, channels, size, size)).astype(np.uint8)
    band = max(1, size // (num_classes + 2))
    for i, c in enumerate(labels):
        row = band * (int(c) % (size // band))
        images[i, :, row: row + band, :] = 230
    return images, labels


def write_fashion_mnist(root: Path, n_train: int = 256, n_test: int = 128, gz: bool = False,
                        folder: Path | None = None, seed: int = 0) -> Path:
    """The four Fashion-MNIST idx files (uncompressed names, or `.gz` when gz) in `folder`
    (default <root>/FashionMNIST/raw, where the loader looks). Returns the folder."""
    folder = folder or root / "FashionMNIST" / "raw"
    for train, n in ((True, n_train), (False, n_test)):
        images, labels = banded_images(n, 1, 28, 10, seed + int(train))
        img_name, lbl_name = FASHION_FILES[train]
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{img_name}{suffix}", images[:, 0], gz)       # idx stores (N, 28, 28)
        write_idx(folder / f"{lbl_name}{suffix}", labels.astype(np.uint8), gz)
    return folder


def cifar_batch(images: np.ndarray, labels: np.ndarray, label_key: str) -> dict[str, Any]:
    """A batch dict as the CIFAR python pickles hold it (rows are the CHW-flattened images)."""
    entry: dict[str, Any] = {"batch_label": "testing batch", "data": images.reshape(len(images), -1),
                             label_key: [int(v) for v in labels],
                             "filenames": [f"img_{i}.png" for i in range(len(images))]}
    if label_key == "fine_labels":
        entry["coarse_labels"] = [int(v) // 5 for v in labels]
    return entry


def write_cifar(root: Path, name: str, n_per_file: int = 8, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """Write the folder of `name` ('cifar10' | 'cifar100') under root, every train/test file of the
    real layout with n_per_file images. Returns (folder, {file name: images (N, 3, 32, 32)})."""
    folder_name, _, _, _, train_files, test_files, label_key = CIFAR[name]
    folder = root / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    num_classes = 100 if name == "cifar100" else 10
    written: dict[str, np.ndarray] = {}
    for k, fname in enumerate([*train_files, *test_files]):
        images, labels = banded_images(n_per_file, 3, 32, num_classes, seed + k)
        images[:, 1] //= 2      # distinct channels, so a wrong (HWC) reshape is caught
        images[:, 2] = 17
        with open(folder / fname, "wb") as fh:
            pickle.dump(cifar_batch(images, labels, label_key), fh, protocol=2)
        written[fname] = images
    return folder, written


def base_params_dict(*profiles: str) -> dict[str, Any]:
    """The committed params.yaml composed with conf/profile overlays, as a plain dict."""
    with open(REPO / "params.yaml", encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    return compose(raw, list(profiles), REPO / "conf" / "profile")


def tiny_params(root: Path, **sections: dict[str, Any]) -> Params:
    """params.yaml + ci profile on synthetic Fashion-MNIST files under `root`, progress bars off;
    `sections` deep-update the dict (e.g. pretrain={'optim': {'epochs': 1}})."""
    raw = base_params_dict("ci")
    overlay: dict[str, Any] = {
        "data": {"root": str(root), "n_train": 128, "n_val": 64},
        "runtime": {"progress": False, "device": "cpu"},
        "pretrain": {"optim": {"epochs": 2, "batch_size": 32, "milestones": [1]}},
        "finetune": {"optim": {"epochs": 1, "batch_size": 32, "milestones": []}},
        "evaluate": {"n_eval": 64, "batch_size": 32},
    }
    raw = deep_merge(deep_merge(raw, overlay), dict(sections))
    return parse_params(raw, "tiny params")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:   # keep pytest's output clean
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass   # torchvision probes the URL for redirects and hangs up mid-body: a broken pipe, harmless


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """A loopback HTTP server (127.0.0.1) publishing `folder`; yields its base URL. It stands in for
    the dataset hosts, so torchvision's real download code runs without a network."""
    server = _QuietServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def python_stdout(code: str, *args: str, cwd: Path = REPO) -> str:
    """Stdout of `code` run by a fresh interpreter with this checkout on its path (what a module imports,
    or a command does, from process start: nothing the test process already loaded counts)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)}).stdout


_ARPIPE_PROBE = ("import runpy, sys\n"
                 "sys.argv = ['arpipe'] + sys.argv[1:]\n"
                 "try:\n    runpy.run_module('stages.cli', run_name='__main__')\n"
                 "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
                 "print('EXIT', code, sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])\n")


def arpipe_torch_probe(*args: str, cwd: Path = REPO) -> str:
    """Stdout of `arpipe <args>` run by a fresh interpreter, its last line `EXIT <exit code> <the first torch
    modules it loaded>`: `EXIT 0 []` is a run that passed without importing torch."""
    return python_stdout(_ARPIPE_PROBE, *args, cwd=cwd)
