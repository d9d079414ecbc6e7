"""Crash-safe file writes.

Every file a stage produces goes through `atomic_write`: the bytes land in a
temporary file in the same directory, are fsynced, then `os.replace`d over the
target. A kill at any point leaves either the old file or the new one, never a
truncated one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import UserError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates its file 0600; the installed file gets the mode a plain open() would give it.
_FILE_MODE = 0o666 & ~_read_umask()


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on clean exit it replaces `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _FILE_MODE)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], Any]) -> None:
    """Call `writer(fh)` on a binary handle and atomically install the result at `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer(fh)


class OutputPathError(UserError, OSError):
    """An output path cannot be written; raised before any work, naming the path."""


def check_writable(*paths: str | os.PathLike[str]) -> None:
    """Fail before any work when one of `paths` could not be written at the end of it.

    Each path must not be a directory, and its nearest existing ancestor must be a
    directory where a file can be created. That is probed by creating (and removing) a
    file there, so read-only mounts, ACLs and root behave exactly as the real write will.
    """
    probed: set[Path] = set()
    for path in paths:
        target = Path(path)
        if target.is_dir():
            raise OutputPathError(f"output {target} is a directory; remove it or choose another path")
        folder = target.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if folder in probed:
            continue
        if not folder.is_dir():
            raise OutputPathError(f"cannot write {target}: {folder} is a file, not a directory")
        try:
            fd, probe = tempfile.mkstemp(prefix=".arpipe-write-check.", dir=folder)
        except OSError as exc:
            raise OutputPathError(f"cannot write {target}: {folder} is not writable ({exc.strerror}); make it "
                                  "writable or choose another output path") from None
        os.close(fd)
        os.unlink(probe)
        probed.add(folder)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Atomically write `data` as pretty, key-sorted JSON (stable diffs for committed metrics)."""
    payload = (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(payload))


def write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
