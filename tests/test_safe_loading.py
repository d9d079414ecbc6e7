"""Hostile and damaged files: no code runs from a data file, and every corrupt file is named in one line.

Planted failures: a CIFAR batch whose pickle would create a marker file, truncated CIFAR
pickles, truncated / random idx files, checkpoints cut in half, empty, bare state_dicts
and checkpoints whose header names another architecture than its weights.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline_lib import checkpoint
from pipeline_lib.data import load_split
from pipeline_lib.data.safe_pickle import UnsafePickleError, load_plain_pickle
from pipeline_lib.data.sources import CIFAR, FASHION_FILES, DataFileError, read_idx
from pipeline_lib.errors import UserError
from pipeline_lib.models import build_model

from datafiles import banded_images, cifar_batch, idx_bytes, write_cifar, write_fashion_mnist


class _TouchMarker:
    """Unpickling this runs os.system: what a malicious data file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- pickles
@pytest.mark.parametrize("protocol", [2, 5])
def test_malicious_cifar_batch_does_not_run(tmp_path: Path, protocol: int) -> None:
    folder, _ = write_cifar(tmp_path, "cifar10", n_per_file=2)
    marker = tmp_path / "PWNED"
    evil = cifar_batch(*banded_images(2, 3, 32, 10, 0), "labels")
    evil["labels"] = _TouchMarker(marker)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(evil, fh, protocol=protocol)
    with open(folder / "test_batch", "rb") as fh:   # the planted file really runs its payload under pickle.load
        pickle.load(fh)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafePickleError) as info:
        load_split("cifar10", tmp_path, train=False)
    assert not marker.exists()
    msg = _one_line(info.value)
    assert str(folder / "test_batch") in msg and "posix.system" in msg
    assert isinstance(info.value, UserError)


def test_real_format_spellings_still_load(tmp_path: Path) -> None:
    """The published batches (Python 2) name numpy.core.multiarray._reconstruct; Python 3 writers
    use numpy._core, _codecs.encode (protocol 2) or _frombuffer (protocol 5): all are plain arrays."""
    images, labels = banded_images(5, 3, 32, 10, 3)
    entry = cifar_batch(images, labels, "labels")
    entry["labels"] = [np.int64(v) for v in labels]            # numpy scalars: multiarray.scalar
    for protocol in (2, 4, 5):
        blob = pickle.dumps(entry, protocol=protocol)
        # protocol 2's GLOBAL opcode is plain text: rename the module as the published files spell it
        for spelling in (b"numpy._core", b"numpy.core") if protocol == 2 else (b"numpy._core",):
            path = tmp_path / f"batch_{protocol}_{spelling.decode()}"
            path.write_bytes(blob.replace(b"numpy._core", spelling))
            got = load_plain_pickle(path)
            np.testing.assert_array_equal(got["data"], entry["data"])
            assert [int(v) for v in got["labels"]] == [int(v) for v in labels]
            assert got["filenames"] == entry["filenames"]


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj"
    path.write_bytes(pickle.dumps({"data": np.array([1, "a"], dtype=object)}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="object dtype"):
        load_plain_pickle(path)


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.97])
def test_truncated_cifar_pickle_is_named(tmp_path: Path, keep: float) -> None:
    folder, _ = write_cifar(tmp_path, "cifar100", n_per_file=4)
    path = folder / CIFAR["cifar100"][5][0]
    blob = path.read_bytes()
    path.write_bytes(blob[:int(len(blob) * keep)])
    with pytest.raises(DataFileError) as info:
        load_split("cifar100", tmp_path, train=False)
    msg = _one_line(info.value)
    assert str(path) in msg and "truncated" in msg


# --------------------------------------------------------------------------- idx
def test_truncated_gz_idx_is_named(tmp_path: Path) -> None:
    raw = write_fashion_mnist(tmp_path, n_train=10, n_test=10, gz=True)
    path = raw / f"{FASHION_FILES[False][0]}.gz"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataFileError) as info:
        read_idx(path)
    assert str(path) in _one_line(info.value)


@pytest.mark.parametrize("seed", range(6))
def test_random_idx_is_named(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path = tmp_path / "t10k-images-idx3-ubyte"
    # a valid-looking magic with random dims and body, or pure noise
    body = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
    path.write_bytes((bytes([0, 0, 8, int(rng.integers(0, 256))]) if seed % 2 else b"") + body)
    with pytest.raises(DataFileError) as info:
        read_idx(path)
    assert str(path) in _one_line(info.value)


def test_valid_idx_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "ok"
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path.write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(path), array)


# --------------------------------------------------------------------------- checkpoints
@pytest.fixture
def saved(tmp_path: Path, tiny_model: nn.Module) -> Path:
    path = tmp_path / "model.pt"
    checkpoint.save_model(path, tiny_model, arch="small_cnn", dataset="fashion_mnist", meta={"method": "pgd_at"})
    return path


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0])
def test_cut_checkpoint_is_named(saved: Path, keep: float) -> None:
    blob = saved.read_bytes()
    saved.write_bytes(blob[:int(len(blob) * keep)])
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_model(saved)
    msg = _one_line(info.value)
    assert str(saved) in msg
    assert ("empty (0 bytes)" if keep == 0 else "truncated") in msg


def test_bare_state_dict_is_named(saved: Path, tiny_model: nn.Module) -> None:
    torch.save(tiny_model.state_dict(), saved)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_model(saved)
    msg = _one_line(info.value)
    assert str(saved) in msg and "bare state_dict" in msg


def test_header_arch_mismatch_is_summarised(saved: Path, fmnist_spec: object) -> None:
    resnet = build_model("resnet18", fmnist_spec)   # type: ignore[arg-type]
    ckpt = torch.load(saved, weights_only=True)
    small = set(ckpt["state_dict"])
    ckpt["state_dict"] = resnet.state_dict()        # header still says small_cnn
    torch.save(ckpt, saved)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_model(saved)
    msg = _one_line(info.value)
    assert str(saved) in msg and "arch='small_cnn'" in msg
    assert f"{len(set(resnet.state_dict()) - small)} unexpected" in msg                 # counted ...
    assert f"{len(small - set(resnet.state_dict()))} missing" in msg
    assert len(msg) < 600 and sum(k in msg for k in resnet.state_dict()) <= 6     # ... not dumped


def test_shape_mismatch_is_named(saved: Path) -> None:
    ckpt = torch.load(saved, weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.ndim == 2)
    ckpt["state_dict"][name] = torch.zeros(3, 3)
    torch.save(ckpt, saved)
    with pytest.raises(checkpoint.CheckpointError, match=rf"1 shape mismatched .*{name} \(3, 3\) vs"):
        checkpoint.load_model(saved)


@pytest.mark.parametrize("text", ['{"format": "arpipe-corr', "[1, 2]"], ids=["cut", "a-list"])
def test_damaged_corrupted_set_manifest_is_named(tmp_path: Path, text: str) -> None:
    from pipeline_lib.corruption.store import MANIFEST, CorruptedSetError, read_manifest

    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(CorruptedSetError) as info:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in _one_line(info.value)
