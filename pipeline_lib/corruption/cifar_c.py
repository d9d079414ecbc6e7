"""The released CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019) from Zenodo.

Each is one uncompressed tar (~2.9 GB) holding a folder of `<corruption>.npy`
(50000, 32, 32, 3) uint8 and `labels.npy`: the layout `store.CorruptedSet` reads.
`ensure_released` finds, in this order, the extracted folder under `root`, the archive
under `root` (md5-checked, then extracted), or downloads the archive (torchvision's
download code) when allowed. Downloads land in a `.part` file and extraction in a
temporary folder, each moved into place only when complete, so an interrupted run
never leaves a half archive or half folder that looks finished.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.utils import calculate_md5, download_url, extract_archive

from ..data import DataUnavailableError
from .store import LABELS
from ..errors import UserError


@dataclass(frozen=True)
class ReleasedSet:
    dataset: str
    folder: str     # the folder the archive extracts to
    archive: str
    url: str
    md5: str        # of the archive, as listed on the Zenodo record


RELEASED: dict[str, ReleasedSet] = {
    "cifar10": ReleasedSet("cifar10", "CIFAR-10-C", "CIFAR-10-C.tar",
                           "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar",
                           "56bf5dcef84df0e2308c6dcbcbbd8499"),
    "cifar100": ReleasedSet("cifar100", "CIFAR-100-C", "CIFAR-100-C.tar",
                            "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar",
                            "11f0ed0f1191edbf9fa23466ae6021d3"),
}
IMAGES_PER_SEVERITY = 10_000


class ChecksumError(UserError, RuntimeError):
    """A downloaded or local archive does not have the published md5 (truncated or corrupted)."""


def released(dataset: str) -> ReleasedSet:
    try:
        return RELEASED[dataset]
    except KeyError:
        raise ValueError(f"no released corrupted set for dataset {dataset!r}; released: "
                         f"{', '.join(sorted(RELEASED))} (use corruption.source: generated)") from None


def verify_md5(path: Path, expected: str) -> None:
    actual = calculate_md5(path)
    if actual != expected:
        size = path.stat().st_size
        raise ChecksumError(f"{path} ({size} bytes) has md5 {actual}, expected {expected}: the file is "
                            "truncated or corrupted; delete it and download it again")


def extract(archive: Path, spec: ReleasedSet, root: Path) -> Path:
    """Extract `archive` into a temporary folder under root, then move `spec.folder` into place."""
    target = root / spec.folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.extract-", dir=root))
    try:
        try:
            extract_archive(str(archive), str(tmp))
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ChecksumError(f"{archive} could not be extracted ({exc}): truncated or not a tar archive") from exc
        inner = tmp / spec.folder
        if not (inner / LABELS).is_file():
            found = sorted(p.name for p in tmp.iterdir())
            raise ChecksumError(f"{archive} does not contain {spec.folder}/{LABELS} (top level: {found})")
        os.replace(inner, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_released(dataset: str, root: str | Path, download: bool) -> Path:
    """The extracted folder of `dataset`'s released corrupted set, fetching/extracting it if needed."""
    spec = released(dataset)
    root = Path(root)
    folder, archive = root / spec.folder, root / spec.archive
    if (folder / LABELS).is_file():
        return folder
    if not archive.is_file():
        if not download:
            raise DataUnavailableError(
                f"{spec.folder} not found: neither {folder}/ nor {archive} exists. Set corruption.download: "
                f"true (needs network), or put {spec.archive} from {spec.url} (md5 {spec.md5}) into {root}/.")
        root.mkdir(parents=True, exist_ok=True)
        part = root / f"{spec.archive}.part"
        try:
            download_url(spec.url, str(root), filename=part.name)
        except Exception as exc:  # urllib raises many types
            raise DataUnavailableError(f"downloading {spec.url} failed ({exc}); fetch {spec.archive} "
                                       f"(md5 {spec.md5}) by hand into {root}/") from exc
        try:
            verify_md5(part, spec.md5)
        except ChecksumError:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, archive)
    else:
        verify_md5(archive, spec.md5)
    return extract(archive, spec, root)
