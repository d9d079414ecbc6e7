"""Data: the real readers on small files in the published formats, downloads, subsets, the batch loader."""

from __future__ import annotations

import gzip
import hashlib
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.data import BatchLoader, DataUnavailableError, load_split, load_test, load_train, sources
from pipeline_lib.data.sources import CIFAR, FASHION_FILES, read_idx

from datafiles import idx_bytes, serve_folder, write_cifar, write_fashion_mnist, write_idx


@pytest.fixture
def no_debian_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the Debian fallback at an empty folder, as on a machine without the package."""
    empty = tmp_path / "no-debian"
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", empty)
    return empty


# --------------------------------------------------------------------------- idx / Fashion-MNIST
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_raw_and_gz(tmp_path: Path, gz: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / ("x.idx.gz" if gz else "x.idx"), images, gz)
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3])                       # magic 0x00000803
    assert raw[4:8] == (2).to_bytes(4, "big")                    # first dim, big-endian
    np.testing.assert_array_equal(read_idx(path), images)


def test_fashion_mnist_files_load_through_the_public_api(tmp_path: Path, no_debian_copy: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=40, n_test=30)
    raw = tmp_path / "FashionMNIST" / "raw"
    expected = read_idx(raw / FASHION_FILES[True][0])
    labels = read_idx(raw / FASHION_FILES[True][1])

    x, y = load_split("fashion_mnist", tmp_path, train=True)
    assert x.dtype == torch.uint8 and x.shape == (40, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (40,)
    np.testing.assert_array_equal(x[:, 0].numpy(), expected)
    np.testing.assert_array_equal(y.numpy(), labels)

    xt, yt = load_test("fashion_mnist", tmp_path, n=10)
    assert xt.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(yt.numpy(), read_idx(raw / FASHION_FILES[False][1])[:10])

    xs, ys = load_train("fashion_mnist", tmp_path, n=16, seed=3)
    assert xs.shape == (16, 1, 28, 28) and ys.shape == (16,)


def test_debian_gz_copy_is_decompressed_into_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = write_fashion_mnist(tmp_path, n_train=12, n_test=8, gz=True, folder=tmp_path / "debian")
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", debian)
    root = tmp_path / "data"
    x, y = load_split("fashion_mnist", root, train=False)
    assert x.shape == (8, 1, 28, 28)
    for name in (n for pair in FASHION_FILES.values() for n in pair):
        unpacked = (root / "FashionMNIST" / "raw" / name).read_bytes()
        assert unpacked == gzip.decompress((debian / f"{name}.gz").read_bytes())
    np.testing.assert_array_equal(y.numpy(), read_idx(debian / f"{FASHION_FILES[False][1]}.gz"))


def test_truncated_idx_is_a_clear_error(tmp_path: Path, no_debian_copy: Path) -> None:
    raw = write_fashion_mnist(tmp_path, n_train=10, n_test=10)
    path = raw / FASHION_FILES[True][0]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated or corrupt.*\[10, 28, 28\]") as info:
        load_split("fashion_mnist", tmp_path, train=True)
    assert str(path) in str(info.value)


def test_not_an_idx_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"PK\x03\x04" + idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match="not a uint8 idx file"):
        read_idx(path)


def test_images_and_labels_that_disagree_are_rejected(tmp_path: Path, no_debian_copy: Path) -> None:
    raw = write_fashion_mnist(tmp_path, n_train=10, n_test=10)
    write_idx(raw / FASHION_FILES[True][1], np.zeros(9, np.uint8))
    with pytest.raises(ValueError, match="disagree"):
        load_split("fashion_mnist", tmp_path, train=True)


def test_fashion_mnist_missing_offline_says_how_to_get_it(tmp_path: Path, no_debian_copy: Path) -> None:
    with pytest.raises(DataUnavailableError) as info:
        load_split("fashion_mnist", tmp_path, train=True, download=False)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "data.download" in msg
    assert str(tmp_path / "FashionMNIST" / "raw") in msg


# --------------------------------------------------------------------------- CIFAR pickles
@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_batches_load_in_chw_order(tmp_path: Path, name: str) -> None:
    _, written = write_cifar(tmp_path, name, n_per_file=6)
    _, _, _, _, train_files, test_files, label_key = CIFAR[name]

    x, y = load_split(name, tmp_path, train=True)
    assert x.dtype == torch.uint8 and x.shape == (6 * len(train_files), 3, 32, 32)
    assert y.dtype == torch.int64 and y.shape == (len(x),)
    expected = np.concatenate([written[f] for f in train_files])
    np.testing.assert_array_equal(x.numpy(), expected)
    assert (x[:, 2] == 17).all()                     # channel 2 is constant in the files: CHW kept

    xt, yt = load_test(name, tmp_path, n=4)
    np.testing.assert_array_equal(xt.numpy(), written[test_files[0]][:4])
    num_classes = 100 if label_key == "fine_labels" else 10
    assert int(yt.max()) < num_classes


def test_cifar_missing_offline_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError) as info:
        load_split("cifar10", tmp_path, train=True, download=False)
    msg = str(info.value)
    assert "data.download: true" in msg and "cifar-10-python.tar.gz" in msg and CIFAR["cifar10"][2] in msg


def test_cifar_partial_folder_is_a_clear_error(tmp_path: Path) -> None:
    folder, _ = write_cifar(tmp_path, "cifar10", n_per_file=2)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataUnavailableError, match="data_batch_3"):
        load_split("cifar10", tmp_path, train=True, download=False)


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A local HTTP server over a folder: (folder, base url). Exercises torchvision's real download code."""
    served = tmp_path / "served"
    served.mkdir()
    with serve_folder(served) as base:
        yield served, base


def _publish_cifar(tmp_path: Path, served: Path, name: str) -> tuple[str, dict[str, np.ndarray]]:
    """Pack a small CIFAR folder the way the real archive is packed; return (md5, written images)."""
    folder, written = write_cifar(tmp_path / "src", name, n_per_file=4)
    archive = served / CIFAR[name][1]
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return hashlib.md5(archive.read_bytes()).hexdigest(), written


def _point_cifar_at(monkeypatch: pytest.MonkeyPatch, name: str, url: str, md5: str) -> None:
    entry = list(CIFAR[name])
    entry[2], entry[3] = url, md5
    monkeypatch.setitem(sources.CIFAR, name, tuple(entry))


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_download_checks_md5_and_extracts(tmp_path: Path, http_dir: tuple[Path, str],
                                                monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    served, base = http_dir
    md5, written = _publish_cifar(tmp_path, served, name)
    _point_cifar_at(monkeypatch, name, f"{base}/{CIFAR[name][1]}", md5)
    root = tmp_path / "data"

    x, _ = load_split(name, root, train=False, download=True)
    test_file = CIFAR[name][5][0]
    np.testing.assert_array_equal(x.numpy(), written[test_file])
    assert (root / CIFAR[name][0]).is_dir()


def test_cifar_download_with_wrong_md5_is_refused(tmp_path: Path, http_dir: tuple[Path, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    served, base = http_dir
    md5, _ = _publish_cifar(tmp_path, served, "cifar10")
    wrong = hashlib.md5(md5.encode()).hexdigest()
    _point_cifar_at(monkeypatch, "cifar10", f"{base}/{CIFAR['cifar10'][1]}", wrong)
    root = tmp_path / "data"
    with pytest.raises(DataUnavailableError, match="cifar10.*by hand"):
        load_split("cifar10", root, train=True, download=True)
    assert not (root / CIFAR["cifar10"][0]).exists()   # nothing unverified was extracted


def test_cifar_download_unreachable_is_a_clear_error(tmp_path: Path, http_dir: tuple[Path, str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, base = http_dir
    _point_cifar_at(monkeypatch, "cifar10", f"{base}/missing.tar.gz", "0" * 32)
    with pytest.raises(DataUnavailableError, match="downloading cifar10 from .*missing.tar.gz failed"):
        load_split("cifar10", tmp_path, train=True, download=True)


def test_unknown_dataset_is_named(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="'svhn'"):
        load_split("svhn", tmp_path, train=True)


# --------------------------------------------------------------------------- subsets
def _fake_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return x, torch.arange(n)


def test_train_subset_is_seeded_and_sorted() -> None:
    from pipeline_lib.data import train_subset

    x, y = _fake_split(200)
    a = train_subset(x, y, 50, seed=1)[1]
    assert torch.equal(a, train_subset(x, y, 50, seed=1)[1])
    assert not torch.equal(a, train_subset(x, y, 50, seed=2)[1])
    assert len(a.unique()) == 50 and torch.equal(a, a.sort().values)
    assert torch.equal(train_subset(x, y, None, seed=1)[1], y)


def test_test_subset_is_the_first_n() -> None:
    from pipeline_lib.data import test_subset

    x, y = _fake_split(100)
    xs, ys = test_subset(x, y, 30)
    assert torch.equal(ys, torch.arange(30)) and torch.equal(xs, x[:30])


# --------------------------------------------------------------------------- batch loader
def _loader(**kw: object) -> BatchLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(50)
    return BatchLoader(images, labels, 16, **kw)  # type: ignore[arg-type]


def _epoch(loader: BatchLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_batch_loader_shapes_dtype_and_range() -> None:
    loader = _loader()
    batches = _epoch(loader, 0)
    assert len(loader) == len(batches) == 4 and [len(y) for _, y in batches] == [16, 16, 16, 2]
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 8, 8) and y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(50))   # no shuffle: in order
    assert torch.allclose(batches[0][0], loader.images[:16].float() / 255)
    assert len(_loader(drop_last=True)) == 3


def test_batch_loader_order_depends_on_seed_and_epoch_only() -> None:
    a, b = _loader(shuffle=True, seed=1), _loader(shuffle=True, seed=1)
    ya = torch.cat([y for _, y in _epoch(a, 2)])
    assert torch.equal(ya, torch.cat([y for _, y in _epoch(b, 2)]))              # same seed + epoch
    assert not torch.equal(ya, torch.cat([y for _, y in _epoch(a, 3)]))          # another epoch
    assert not torch.equal(ya, torch.cat([y for _, y in _epoch(_loader(shuffle=True, seed=2), 2)]))
    assert torch.equal(ya.sort().values, torch.arange(50))                       # a permutation


@pytest.mark.parametrize("kind", ["flip", "crop_flip"])
def test_augmentation_keeps_shape_range_and_is_reproducible(kind: str) -> None:
    plain = _epoch(_loader(), 0)
    aug1, aug2 = _epoch(_loader(augment=kind, seed=5), 0), _epoch(_loader(augment=kind, seed=5), 0)
    other_epoch = _epoch(_loader(augment=kind, seed=5), 1)
    for (xp, yp), (x1, y1), (x2, _) in zip(plain, aug1, aug2, strict=True):
        assert x1.shape == xp.shape and torch.equal(y1, yp)
        assert float(x1.min()) >= 0.0 and float(x1.max()) <= 1.0
        assert torch.equal(x1, x2)
    assert not all(torch.equal(a[0], p[0]) for a, p in zip(aug1, plain, strict=True))
    assert not all(torch.equal(a[0], o[0]) for a, o in zip(aug1, other_epoch, strict=True))


def test_flip_mirrors_whole_images() -> None:
    (x, _), *_ = _epoch(_loader(), 0)
    (xa, _), *_ = _epoch(_loader(augment="flip", seed=5), 0)
    for orig, aug in zip(x, xa, strict=True):
        assert torch.equal(aug, orig) or torch.equal(aug, orig.flip(-1))


def test_batch_loader_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        BatchLoader(torch.zeros(4, 1, 2, 2), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        BatchLoader(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(3), 2)


@pytest.mark.skipif(not all((sources.DEBIAN_FASHION_MNIST / f"{n}.gz").exists()
                            for pair in FASHION_FILES.values() for n in pair),
                    reason="Debian's dataset-fashion-mnist package is not installed")
def test_real_debian_fashion_mnist_test_split(tmp_path: Path) -> None:
    x, y = load_split("fashion_mnist", tmp_path, train=False)
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.uint8
    assert y[:5].tolist() == [9, 2, 1, 1, 6]          # the published test set's first labels
    assert sorted(y.unique().tolist()) == list(range(10))
