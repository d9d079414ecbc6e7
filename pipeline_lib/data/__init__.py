"""Datasets: specs, file readers in the published formats, subsets and the batch loader.

`pipeline_lib.config` validates dataset names against `spec`, and importing `pipeline_lib.data.spec`
runs this file first: so it imports no torch. The torch-side names load on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .spec import SPECS, DatasetSpec, get_spec

if TYPE_CHECKING:
    from .loader import BatchLoader, augment
    from .sources import DataUnavailableError, load_split
    from .splits import load_test, load_train, test_subset, train_subset

_LAZY = {"BatchLoader": "loader", "augment": "loader", "DataUnavailableError": "sources", "load_split": "sources",
         "load_test": "splits", "load_train": "splits", "test_subset": "splits", "train_subset": "splits"}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = ["SPECS", "BatchLoader", "DataUnavailableError", "DatasetSpec", "augment", "get_spec",
           "load_split", "load_test", "load_train", "test_subset", "train_subset"]
