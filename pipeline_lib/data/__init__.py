"""Datasets: specs, file readers in the published formats, subsets and the batch loader.

`pipeline_lib.config` validates dataset names against `spec`, and importing `pipeline_lib.data.spec`
runs this file first: so it imports no torch. The torch-side names load on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .spec import SPECS, DatasetSpec, get_spec

if TYPE_CHECKING:
    from .loader import BatchLoader, augment
    from .sources import DataUnavailableError, load_split
    from .splits import load_test, load_train, test_subset, train_subset

_LAZY = {"BatchLoader": "loader", "augment": "loader", "DataUnavailableError": "sources", "load_split": "sources",
         "load_test": "splits", "load_train": "splits", "test_subset": "splits", "train_subset": "splits"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SPECS", "BatchLoader", "DataUnavailableError", "DatasetSpec", "augment", "get_spec",
           "load_split", "load_test", "load_train", "test_subset", "train_subset"]
