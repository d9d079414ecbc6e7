"""Reading the datasets' files in their published formats into uint8 tensors.

Each reader returns (images, labels): images uint8 (N, C, H, W), labels int64 (N,).
Offline machines: Fashion-MNIST comes from Debian's `dataset-fashion-mnist`
package when present; CIFAR needs the download (torchvision's code, md5-checked)
or the extracted `cifar-10-batches-py` / `cifar-100-python` folder under `root`.
"""

from __future__ import annotations

import gzip
import math
import pickle
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ..io import atomic_path
from .safe_pickle import UnsafePickleError, load_plain_pickle

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

CIFAR = {
    # name: (folder, archive, url, archive md5, train files, test files, label key)
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 ["train"], ["test"], "fine_labels"),
}


class DataUnavailableError(UserError, RuntimeError):
    """The dataset's files are not on disk and could not be fetched; the message says how to get them."""


class DataFileError(UserError, ValueError):
    """A dataset file is truncated or not in its published format; the message names the file."""


REFETCH = "delete it so it is fetched or extracted again"


# --------------------------------------------------------------------------- idx (MNIST family)
def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally .gz): magic 0x0000 | dtype 0x08 (uint8) | ndim, then big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:   # a cut or damaged .gz
        raise DataFileError(f"{path} is a truncated or corrupt gzip file ({exc}); {REFETCH}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataFileError(f"{path} is not a uint8 idx file (header {data[:4].hex() or 'empty'}); {REFETCH}")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataFileError(f"{path} is truncated or corrupt: {len(data)} bytes cannot hold the {ndim} dims its "
                            f"header announces; {REFETCH}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(dims)   # exact (Python ints): random headers must not overflow into a match
    if len(data) - offset != expected:
        raise DataFileError(f"{path} is truncated or corrupt: header says {dims} ({expected} bytes), "
                            f"file has {len(data) - offset}; {REFETCH}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def ensure_fashion_mnist(root: Path, download: bool) -> Path:
    """Return <root>/FashionMNIST/raw with the four uncompressed idx files, making it if needed.

    Order: existing files; Debian's copy (decompressed, because its .gz were
    recompressed and fail torchvision's md5 list); torchvision's download.
    """
    raw = root / "FashionMNIST" / "raw"
    names = [n for pair in FASHION_FILES.values() for n in pair]
    if all((raw / n).exists() for n in names):
        return raw
    if all((DEBIAN_FASHION_MNIST / f"{n}.gz").exists() for n in names):
        raw.mkdir(parents=True, exist_ok=True)
        for n in names:
            with atomic_path(raw / n) as tmp, gzip.open(DEBIAN_FASHION_MNIST / f"{n}.gz", "rb") as src, \
                    open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return raw
    if download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except Exception as exc:  # network errors come in many types
            raise DataUnavailableError(
                f"Fashion-MNIST is not under {raw} and the download failed ({exc}). Offline, install "
                "Debian's copy: `apt-get install dataset-fashion-mnist`.") from exc
        return raw
    raise DataUnavailableError(
        f"Fashion-MNIST not found under {raw} nor in {DEBIAN_FASHION_MNIST}. Run "
        "`apt-get install dataset-fashion-mnist`, or set data.download: true with network access.")


def load_fashion_mnist(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    raw = ensure_fashion_mnist(root, download)
    img_name, lbl_name = FASHION_FILES[train]
    images = read_idx(raw / img_name)
    labels = read_idx(raw / lbl_name)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataFileError(f"Fashion-MNIST files in {raw} disagree: images {images.shape}, labels {labels.shape}; "
                            f"{REFETCH}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- CIFAR pickles
def ensure_cifar(name: str, root: Path, download: bool, train: bool = True) -> Path:
    """The extracted folder holding the batch files of the split(s) needed: training needs every
    file, evaluation (train=False) only the test batch, so published models evaluate without them."""
    folder, archive, url, md5, train_files, test_files, _ = CIFAR[name]
    path = root / folder
    needed = (*train_files, *test_files) if train else tuple(test_files)
    # Every batch file, not just the folder: an interrupted extraction leaves a partial folder.
    missing = [f for f in needed if not (path / f).is_file()]
    if not missing:
        return path
    if not download:
        found = f"{path} lacks {', '.join(missing)}" if path.is_dir() else f"{name} not found at {path}"
        raise DataUnavailableError(
            f"{found}. Set data.download: true (needs network), or extract "
            f"{archive} from {url} into {root}.")
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(url, str(root), filename=archive, md5=md5)
    except Exception as exc:
        raise DataUnavailableError(f"downloading {name} from {url} failed: {exc}. Extract {archive} "
                                   f"into {root} by hand on a machine with network access.") from exc
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        raise DataUnavailableError(f"{archive} did not contain {folder}/{', '.join(missing)}")
    return path


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python pickle: dict with b'data' (N, 3072) uint8 in CHW order and a label list.

    Loaded by the restricted unpickler (safe_pickle): a file that names any other global is refused.
    """
    try:
        entry = load_plain_pickle(path)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError) as exc:   # what a cut or garbled pickle raises, depending on where it breaks
        raise DataFileError(f"{path} is truncated or not a CIFAR python batch ({type(exc).__name__}: "
                            f"{str(exc)[:120] or 'no message'}); {REFETCH}") from None
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        shown = sorted(map(str, entry))[:6] if isinstance(entry, dict) else type(entry).__name__
        raise DataFileError(f"{path} is not a CIFAR python batch: expected a dict with 'data' and {label_key!r}, "
                            f"got {shown}; {REFETCH}")
    try:
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (ValueError, TypeError) as exc:
        raise DataFileError(f"{path}: 'data' or {label_key!r} is not uint8 (N, 3072) images / integer labels "
                            f"({exc}); {REFETCH}") from None
    if len(data) != len(labels):
        raise DataFileError(f"{path}: {len(data)} images but {len(labels)} labels; {REFETCH}")
    return data, labels


def load_cifar(name: str, root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    folder = ensure_cifar(name, root, download, train)
    _, _, _, _, train_files, test_files, label_key = CIFAR[name]
    parts = [read_cifar_batch(folder / f, label_key) for f in (train_files if train else test_files)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_split(name: str, root: str | Path, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """Full split of a dataset as uint8 (N, C, H, W) images and int64 labels."""
    root = Path(root)
    if name == "fashion_mnist":
        return load_fashion_mnist(root, train, download)
    if name in CIFAR:
        return load_cifar(name, root, train, download)
    raise KeyError(f"unknown dataset {name!r}")
