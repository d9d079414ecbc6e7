"""PEP 562 lazy exports: a package names what its submodules define without importing them.

The torch-free paths (params loading, `gate`, `aggregate`, `profile`) import packages such as
`pipeline_lib.data` or `pipeline_lib.training` for their light parts; the torch parts load when a
name from them is first used:

    __getattr__ = lazy_exports(__name__, {"fit": "loop", ...})   # name -> submodule defining it
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: each name in `where` is imported from its submodule
    when it is looked up (every time: a test's monkeypatch of the submodule shows through)."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
