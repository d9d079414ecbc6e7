"""Profiles: named overlays on the default params (conf/profile/<name>.yaml).

A profile file holds only the keys it changes. Composition is a deep merge
(mappings merge key by key, everything else - lists included - is replaced),
the same rule Hydra applies to a `@package _global_` config group, so the
files work with `dvc exp run -S` + Hydra as well as with `arpipe profile`.
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any

import yaml

PROFILE_DIR = Path("conf/profile")


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = deepcopy(value)
    return out


def available(profile_dir: Path = PROFILE_DIR) -> list[str]:
    return sorted(p.stem for p in profile_dir.glob("*.yaml"))


def load_overlay(name: str, profile_dir: Path = PROFILE_DIR) -> dict[str, Any]:
    path = profile_dir / f"{name}.yaml"
    if not path.exists():
        raise KeyError(f"unknown profile {name!r}; available: {', '.join(available(profile_dir)) or 'none'}")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a profile must be a mapping, got {type(data).__name__}")
    return data


def compose(base: dict[str, Any], names: list[str], profile_dir: Path = PROFILE_DIR) -> dict[str, Any]:
    out = base
    for name in names:
        out = deep_merge(out, load_overlay(name, profile_dir))
    return out
