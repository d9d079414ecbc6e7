"""The released CIFAR-10-C path, offline: a small archive in the real layout, served over HTTP
from a loopback server to torchvision's download code, md5-checked, extracted and read slice by slice."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import serve_folder, tiny_params, write_cifar

from pipeline_lib import checkpoint
from pipeline_lib.corruption import cifar_c
from pipeline_lib.corruption.cifar_c import ChecksumError, ensure_released, released
from pipeline_lib.corruption.config import ALL, SEVERITIES
from pipeline_lib.corruption.store import CorruptedSet, CorruptedSetError, read_manifest
from pipeline_lib.data import DataUnavailableError, get_spec, load_test
from pipeline_lib.io import read_json
from pipeline_lib.models import build_model
from stages.corruption import build_set, score

N = 4  # images per severity in the small archive (the real one has 10000)


def make_archive(where: Path, arrays: dict[str, np.ndarray], labels: np.ndarray, folder: str = "CIFAR-10-C",
                 name: str = "CIFAR-10-C.tar") -> Path:
    """An uncompressed tar holding <folder>/<corruption>.npy and <folder>/labels.npy, as on Zenodo."""
    src = where.parent / "src" / folder
    src.mkdir(parents=True)
    for m, arr in arrays.items():
        np.save(src / f"{m}.npy", arr)
    np.save(src / "labels.npy", np.tile(labels.astype(np.uint8), 5))
    tar_path = where / name
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src, arcname=folder)
    return tar_path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(http_root: tuple[Path, str]) -> tuple[Path, str, dict[str, np.ndarray], np.ndarray]:
    """(archive path, its URL, arrays, labels): random images for all 19 corruptions, N per severity."""
    folder, base = http_root
    rng = np.random.default_rng(0)
    arrays = {m: rng.integers(0, 256, (5 * N, 32, 32, 3), dtype=np.uint8) for m in ALL}
    labels = rng.integers(0, 10, N)
    return make_archive(folder, arrays, labels), f"{base}/CIFAR-10-C.tar", arrays, labels


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(folder, base URL): a loopback HTTP server publishing `folder`, standing in for Zenodo."""
    folder = tmp_path / "zenodo"
    folder.mkdir(exist_ok=True)
    with serve_folder(folder) as base:
        yield folder, base


def serve(monkeypatch: pytest.MonkeyPatch, url: str, tar_path: Path, digest: str | None = None) -> None:
    """Point the cifar10 entry at `url` with the archive's real md5 or a given one."""
    spec = replace(cifar_c.RELEASED["cifar10"], url=url, md5=digest or md5(tar_path))
    monkeypatch.setitem(cifar_c.RELEASED, "cifar10", spec)


def test_download_check_extract_and_load_every_slice(tmp_path, monkeypatch, archive) -> None:
    tar_path, url, arrays, labels = archive
    serve(monkeypatch, url, tar_path)
    root = tmp_path / "data"
    folder = ensure_released("cifar10", root, download=True)
    assert folder == root / "CIFAR-10-C" and (root / "CIFAR-10-C.tar").is_file()
    assert not list(root.glob("*.part")) and not list(root.glob(".CIFAR-10-C.extract-*"))
    cs = CorruptedSet(folder)
    assert cs.names == list(ALL) and cs.n == N
    for m in ALL:
        for s in SEVERITIES:
            x, y = cs.load(m, s)
            np.testing.assert_array_equal(x, arrays[m][(s - 1) * N: s * N])
            np.testing.assert_array_equal(y, labels)
            assert x.dtype == np.uint8 and y.dtype == np.int64
    x, _ = cs.load("fog", 2, n=2)
    np.testing.assert_array_equal(x, arrays["fog"][N: N + 2])
    tar_path.unlink()   # the extracted folder is used from now on: no second download
    assert ensure_released("cifar10", root, download=True) == folder


def test_local_archive_is_checked_and_extracted_without_download(tmp_path, monkeypatch, archive) -> None:
    tar_path, url, arrays, _ = archive
    serve(monkeypatch, url, tar_path)
    root = tmp_path / "data"
    root.mkdir()
    (root / "CIFAR-10-C.tar").write_bytes(tar_path.read_bytes())
    tar_path.unlink()
    folder = ensure_released("cifar10", root, download=False)
    np.testing.assert_array_equal(CorruptedSet(folder).load("snow", 5)[0], arrays["snow"][4 * N:])


def test_checksum_mismatch_on_download_is_a_clear_error(tmp_path, monkeypatch, archive) -> None:
    tar_path, url, _, _ = archive
    serve(monkeypatch, url, tar_path, digest="0" * 32)
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match=f"md5 {md5(tar_path)}, expected {'0' * 32}"):
        ensure_released("cifar10", root, download=True)
    assert not any(root.iterdir()), "a failed download must leave nothing that looks like the archive"


def test_truncated_archive_is_a_clear_error(tmp_path, monkeypatch, archive) -> None:
    tar_path, url, _, _ = archive
    serve(monkeypatch, url, tar_path)
    root = tmp_path / "data"
    root.mkdir()
    (root / "CIFAR-10-C.tar").write_bytes(tar_path.read_bytes()[:50_000])
    with pytest.raises(ChecksumError, match=r"CIFAR-10-C\.tar \(50000 bytes\) has md5 .* truncated or corrupted"):
        ensure_released("cifar10", root, download=False)
    assert not (root / "CIFAR-10-C").exists()


def test_archive_without_the_folder_is_rejected(tmp_path, monkeypatch, http_root) -> None:
    folder, base = http_root
    wrong = make_archive(folder, {"fog": np.zeros((5, 32, 32, 3), np.uint8)}, np.zeros(1), folder="CIFAR-C")
    serve(monkeypatch, f"{base}/CIFAR-10-C.tar", wrong)
    with pytest.raises(ChecksumError, match="does not contain CIFAR-10-C/labels.npy"):
        ensure_released("cifar10", tmp_path / "data", download=True)
    assert not (tmp_path / "data" / "CIFAR-10-C").exists()


def test_truncated_npy_files_are_clear_errors(tmp_path, monkeypatch, archive) -> None:
    tar_path, url, _, _ = archive
    serve(monkeypatch, url, tar_path)
    folder = ensure_released("cifar10", tmp_path / "data", download=True)
    fog = folder / "fog.npy"
    fog.write_bytes(fog.read_bytes()[:5000])
    cs = CorruptedSet(folder)
    with pytest.raises(CorruptedSetError, match=r"fog\.npy is truncated or not a valid \.npy file"):
        cs.load("fog", 1)
    np.testing.assert_array_equal(cs.load("snow", 1)[1], cs.labels[:N])   # the other files still load
    labels = folder / "labels.npy"
    labels.write_bytes(labels.read_bytes()[:100])
    with pytest.raises(CorruptedSetError, match=r"labels\.npy is truncated"):
        CorruptedSet(folder)


def test_missing_set_and_unreachable_url_explain_what_to_do(tmp_path, monkeypatch, http_root) -> None:
    with pytest.raises(DataUnavailableError, match=r"corruption\.download: true.*56bf5dcef84df0e2308c6dcbcbbd8499"):
        ensure_released("cifar10", tmp_path, download=False)
    _, base = http_root
    spec = replace(cifar_c.RELEASED["cifar10"], url=f"{base}/nowhere.tar")
    monkeypatch.setitem(cifar_c.RELEASED, "cifar10", spec)
    with pytest.raises(DataUnavailableError, match="downloading http://127.0.0.1:.*/nowhere.tar failed"):
        ensure_released("cifar10", tmp_path, download=True)
    with pytest.raises(ValueError, match="no released corrupted set for dataset 'fashion_mnist'"):
        released("fashion_mnist")
    assert released("cifar100").url.endswith("records/3555552/files/CIFAR-100-C.tar")


def overfit(dataset: str, x: torch.Tensor, y: torch.Tensor, max_steps: int = 150) -> torch.nn.Module:
    """A small CNN fitted to (x, y) until it gets them all right: its predictions depend on the images."""
    torch.manual_seed(0)
    model = build_model("small_cnn", get_spec(dataset))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xf = x.float() / 255
    for _ in range(max_steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xf), y).backward()
        opt.step()
        with torch.no_grad():
            if (model.eval()(xf).argmax(1) == y).all():
                break
        model.train()
    model.eval()
    assert (model(xf).argmax(1) == y).all(), "the helper model failed to fit its images"
    return model


def test_released_source_through_both_stages(tmp_path, monkeypatch, http_root) -> None:
    """corrupt (source: released) + corruption@model on a small CIFAR-10 whose CIFAR-10-C copies
    the clean test images for `contrast` and blanks them for `fog`: the loader's layout
    (rows per severity, NHWC) and label alignment decide whether the accuracies come out right."""
    root = tmp_path / "data"
    write_cifar(root, "cifar10", n_per_file=8)
    x, y = load_test("cifar10", root, None)
    clean = x.permute(0, 2, 3, 1).numpy()                   # (8, 32, 32, 3) as CIFAR-C stores it
    arrays = {"contrast": np.concatenate([clean] * 5), "fog": np.zeros((40, 32, 32, 3), np.uint8),
              "snow": np.concatenate([clean] * 5)}
    folder, base = http_root
    serve(monkeypatch, f"{base}/CIFAR-10-C.tar", make_archive(folder, arrays, y.numpy()))
    p = tiny_params(root, data={"dataset": "cifar10"},
                    corruption={"source": "released", "download": True, "n_images": 8,
                                "corruptions": ["contrast", "fog"], "extra": ["snow"]})
    out = tmp_path / "corrupted"
    manifest = build_set(p, out, tmp_path / "samples.png")
    assert manifest["source"] == "released" and manifest["n_images"] == 8
    assert read_manifest(out)["archive_md5"] == cifar_c.RELEASED["cifar10"].md5
    assert not list(out.glob("*.npy")), "a released set is referenced, not copied"
    assert (tmp_path / "samples.png").stat().st_size > 0

    model = overfit("cifar10", x, y)
    checkpoint.save_model(tmp_path / "m.pt", model, arch="small_cnn", dataset="cifar10", meta={})
    metrics = score(p, "m", tmp_path / "m.pt", out, tmp_path / "m.json", tmp_path / "m.png")
    assert metrics == read_json(tmp_path / "m.json")
    assert metrics["clean_acc"] == 1.0
    assert metrics["table"]["contrast"] == {str(s): 1.0 for s in SEVERITIES}
    assert metrics["extra_table"]["snow"] == {str(s): 1.0 for s in SEVERITIES}
    blank = metrics["per_corruption"]["fog"]
    assert blank < 1.0
    assert metrics["mean_corruption_acc"] == pytest.approx((1.0 + blank) / 2)
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"

    p_bad = tiny_params(root, data={"dataset": "cifar10"},
                        corruption={"source": "released", "n_images": 8, "corruptions": ["gaussian_noise"]})
    with pytest.raises(CorruptedSetError, match="lacks"):
        build_set(p_bad, tmp_path / "other", tmp_path / "s2.png")
