"""Profiles: named overlays on the default params, composed the way DVC's Hydra integration does.

Layout of conf/ (Hydra's config dir; `.dvc/config` has `hydra.enabled = true`):

    conf/config.yaml            defaults: [base, {profile: null}, _self_]
    conf/base.yaml              THE SOURCE of the default params, with a comment on every key
    conf/profile/<name>.yaml    `# @package _global_` overlays holding only the keys they change;
                                one may start from parts: `defaults: [_part, ..., _self_]`
                                (files named `_*.yaml` are parts, not selectable profiles)

One source of config truth, DVC's Hydra model: **conf/** holds every default and every
profile; **params.yaml is generated** from it - by `arpipe profile [NAME...]` (the default
keeps base.yaml's comments) or by `dvc exp run -S ...` (Hydra) - and is committed because
`dvc repro` reads it. A hand edit of params.yaml works for one `dvc repro` but the next
`dvc exp run` regenerates the file from conf/; `arpipe profile --check` (and a test) report
such drift. Why this way round rather than dropping Hydra: DVC's `-S profile=...`, its
queued sweeps and `dvc exp run` all compose from conf/ natively, so with conf/ as the source
nothing a user runs can silently discard an edit.

Composition is a deep merge: mappings merge key by key, everything else (lists included)
is replaced; profiles apply in the order given. Two paths give the same params:

    compose_hydra(names)        Hydra's compose API on conf/, exactly what
                                `dvc exp run -S 'profile=[a,b]'` writes to params.yaml
    compose(base, names)        the same merge in plain Python over any base mapping
                                (e.g. a customised params file), no Hydra involved
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import yaml
from .errors import UserError

CONF_DIR = Path("conf")
PROFILE_DIR = CONF_DIR / "profile"
BASE_NAME = "base"          # conf/base.yaml, the first entry of conf/config.yaml's defaults list
PARAMS_FILE = Path("params.yaml")
SELF = "_self_"

BASE_HEADER = ("# The default params: THE SOURCE of every default (edit here, then `arpipe profile`).\n"
               "# params.yaml is generated from conf/ (`arpipe profile [NAME...]`, `dvc exp run -S ...`).\n")
# First line of the default params.yaml, which `arpipe profile` generates from conf/base.yaml.
DEFAULT_MARK = "# GENERATED from conf/base.yaml by `arpipe profile`"
DEFAULT_HEADER = (f"{DEFAULT_MARK}: edit conf/base.yaml (the source), not this file,\n"
                  "# then run `arpipe profile`; `dvc exp run` regenerates this file from conf/ (docs/profiles.md).\n")
# First line of a params.yaml that `arpipe profile NAME` composed from conf/ and profiles.
COMPOSED_MARK = "# COMPOSED by `arpipe profile"


class ProfileError(UserError, ValueError):
    """A profile that cannot be composed (unknown name, bad defaults list, cycle); names it."""


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = deepcopy(value)
    return out


def available(profile_dir: Path = PROFILE_DIR) -> list[str]:
    """Selectable profile names (parts, `_*.yaml`, are left out)."""
    return sorted(p.stem for p in profile_dir.glob("*.yaml") if not p.stem.startswith("_"))


def describe(name: str, profile_dir: Path = PROFILE_DIR) -> str:
    """The first comment line of a profile file after its `@package` header (what it is for)."""
    for line in (profile_dir / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and "@package" not in line:
            return line.lstrip("# ").strip()
    return ""


def load_overlay(name: str, profile_dir: Path = PROFILE_DIR) -> dict[str, Any]:
    path = profile_dir / f"{name}.yaml"
    if not path.exists():
        raise KeyError(f"unknown profile {name!r}; available: {', '.join(available(profile_dir)) or 'none'}")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a profile must be a mapping, got {type(data).__name__}")
    return data


def _expanded(name: str, profile_dir: Path, stack: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The overlays profile `name` stands for, in merge order: its parts (its `defaults` list,
    recursively), with its own keys at the `_self_` position - Hydra's defaults-list rule."""
    if name in stack:
        raise ProfileError(f"profile defaults form a cycle: {' -> '.join((*stack, name))}")
    overlay = load_overlay(name, profile_dir)
    parts = overlay.pop("defaults", None)
    if parts is None:
        return [overlay]
    path = profile_dir / f"{name}.yaml"
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise ProfileError(f"{path}: `defaults` must be a list of sibling profile names and _self_, got {parts!r}")
    if SELF not in parts:
        raise ProfileError(f"{path}: list `_self_` in `defaults` (where the file's own keys apply)")
    out: list[dict[str, Any]] = []
    for part in parts:
        out += [overlay] if part == SELF else _expanded(part, profile_dir, (*stack, name))
    return out


def compose(base: dict[str, Any], names: Sequence[str], profile_dir: Path = PROFILE_DIR) -> dict[str, Any]:
    """`base` with the profiles applied in order (plain deep merge; same result as Hydra's)."""
    out = base
    for name in names:
        for overlay in _expanded(name, profile_dir):
            out = deep_merge(out, overlay)
    return out


def hydra_overrides(names: Sequence[str]) -> list[str]:
    """The Hydra override selecting `names` from the profile group, as `dvc exp run -S` takes it."""
    return [f"profile=[{','.join(names)}]"] if names else []


def compose_hydra(names: Sequence[str] = (), overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR
                  ) -> dict[str, Any]:
    """The params Hydra composes from conf/ with the profiles `names` and extra `overrides`
    (`key=value`, Hydra's grammar): what `dvc exp run -S ...` writes to params.yaml."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for name in names:   # a clear message before Hydra's own
        if not (conf_dir / "profile" / f"{name}.yaml").exists():
            raise KeyError(f"unknown profile {name!r}; available: "
                           f"{', '.join(available(conf_dir / 'profile')) or 'none'}")
    try:
        with initialize_config_dir(str(conf_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=[*hydra_overrides(names), *overrides])
        OmegaConf.resolve(cfg)
        data = OmegaConf.to_container(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ProfileError(f"Hydra cannot compose {conf_dir} with {list(names)} {list(overrides)}: {exc}") from None
    assert isinstance(data, dict)
    return data  # type: ignore[return-value]


def dump(params: dict[str, Any]) -> str:
    """YAML text of composed params, byte for byte what DVC's Hydra integration writes."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(params))


def default_body(base_file: Path) -> str:
    """conf/base.yaml's params text (its header removed), comments included."""
    text = base_file.read_text(encoding="utf-8")
    if not text.startswith(BASE_HEADER):
        raise ProfileError(f"{base_file} does not start with the source header:\n{BASE_HEADER}")
    return text[len(BASE_HEADER):]


def default_params_text(base_file: Path) -> str:
    """The default params.yaml, exactly as `arpipe profile` (no name) writes it."""
    return DEFAULT_HEADER + default_body(base_file)


def generated_from(params_text: str) -> list[str] | None:
    """The profiles a params.yaml text says it was generated with ([] = the default), or None
    when its first line carries neither generated header (edited by hand or written by Hydra)."""
    first = params_text.split("\n", 1)[0]
    if first.startswith(DEFAULT_MARK):
        return []
    if first.startswith(COMPOSED_MARK):
        return first[len(COMPOSED_MARK):].split("`", 1)[0].split()
    return None


def drift(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str] = ("params.yaml", "conf"),
          prefix: str = "") -> list[str]:
    """One line per dotted key where two params mappings differ (absent on one side, or another value)."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        where = f"{prefix}{key}"
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += drift(va, vb, labels, where + ".")
        elif va != vb:
            out.append(f"{where}: {labels[0]} {va!r}, {labels[1]} {vb!r}")
    return out
