"""Load pickled dataset files (the CIFAR python batches) without running code from them.

`pickle.load` calls whatever global a file names (os.system included), so a
downloaded or swapped data folder could run code. `load_plain_pickle` admits only the
globals the real files need and refuses every other one before it is called:

    numpy ... _reconstruct, numpy.ndarray     numpy arrays (CIFAR's 'data', uint8 (N, 3072))
    numpy.dtype (no object dtypes)            their dtypes
    numpy ... scalar                           numpy scalars (files written with numpy ints as labels)
    numpy ... _frombuffer                      arrays as protocol-5 pickles write them
    _codecs.encode (latin1 only)              bytes as Python 3 writes them in protocol 2

Dicts, lists, tuples, str, bytes and numbers are pickle opcodes, not globals. The
published files (Python 2, protocol 2) use numpy.core.multiarray._reconstruct,
numpy.ndarray and numpy.dtype; newer numpy spells the module numpy._core.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """A pickled data file asks for a global outside the allowlist; the message names the file and global."""


def _dtype(*args: Any) -> np.dtype[Any]:
    dtype = np.dtype(*args)
    if dtype.hasobject:   # an object array would unpickle arbitrary objects into itself
        raise pickle.UnpicklingError(f"object dtype {dtype} refused")
    return dtype


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Python 3 pickles bytes for protocol 2 as _codecs.encode(text, 'latin1')."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} refused")
    return text.encode("latin1")


def _allowed() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric   # numpy >= 2
    except ImportError:   # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    names: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _dtype,
                                         ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        names[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        names[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        names[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return names


ALLOWED = _allowed()


class PlainUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class admits only ALLOWED (see the module docstring)."""

    def __init__(self, fh: Any, path: Path) -> None:
        super().__init__(fh, encoding="latin1")   # Python 2 str (CIFAR's keys and buffers) -> str
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{self.path} asks to load the global {module}.{name}, which a dataset file "
                                    "never needs (a pickle can run code this way): refused; replace the file with "
                                    "the published one") from None


def load_plain_pickle(path: Path) -> Any:
    """Unpickle `path` admitting only numpy arrays, dtypes and plain containers (see the module docstring)."""
    with open(path, "rb") as fh:
        return PlainUnpickler(fh, path).load()
