"""`arpipe profile`: select a profile for `dvc repro`, and keep conf/ (Hydra) in step with params.yaml.

    arpipe profile cifar10_resnet18          params.yaml = conf/base.yaml + the profile (Hydra's compose,
                                             as `dvc exp run -S profile=cifar10_resnet18` does), validated
    arpipe profile cifar10_wrn34_10 gpu_fast several profiles, applied in order
    arpipe profile                           restore the default params.yaml (from its mirror conf/base.yaml)
    arpipe profile --list                    the profiles and what each is for
    arpipe profile --sync                    after editing params.yaml: regenerate conf/base.yaml from it
    arpipe profile --check                   exit 1 if conf/ no longer composes to params.yaml
    arpipe profile ci --base my.yaml         overlay onto another params file (plain merge, no Hydra)
"""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from pipeline_lib.config import parse_params
from pipeline_lib.io import check_writable, write_text
from pipeline_lib.profiles import (BASE_NAME, COMPOSED_MARK, CONF_DIR, PARAMS_FILE, PROFILE_DIR, ProfileError,
                                   available, base_text, compose, compose_hydra, default_text, describe, drift, dump)

from .common import console, fail


def profile(
    names: list[str] = typer.Argument(None, help="profile(s) from conf/profile, applied in order; none = the default"),
    out: Path = typer.Option(PARAMS_FILE, help="where to write the composed params"),
    conf_dir: Path = typer.Option(CONF_DIR, help="Hydra config folder (config.yaml, base.yaml, profile/)"),
    base: Path | None = typer.Option(None, help="overlay onto this params file instead of conf/base.yaml (no Hydra)"),
    profile_dir: Path = typer.Option(PROFILE_DIR, help="folder of profile overlays (with --base)"),
    list_: bool = typer.Option(False, "--list", help="list the profiles and exit"),
    sync: bool = typer.Option(False, "--sync", help="regenerate conf/base.yaml from params.yaml (--out) and exit"),
    check: bool = typer.Option(False, "--check", help="exit 1 when conf/ does not compose to params.yaml (--out)"),
) -> None:
    """Write params.yaml for a profile (validated first), or sync / check conf/ against params.yaml."""
    names = names or []
    base_file = conf_dir / f"{BASE_NAME}.yaml"
    try:
        if list_:
            for name in available(conf_dir / "profile"):
                console.print(f"{name:<20} {describe(name, conf_dir / 'profile')}", soft_wrap=True, markup=False)
            return
        if sync:
            _sync(out, base_file)
            return
        if check:
            _check(out, conf_dir)
            return
        check_writable(out)
        if base is not None:
            with open(base, encoding="utf-8") as fh:
                composed = compose(yaml.safe_load(fh), names, profile_dir)
            source = f"{base} + {' + '.join(names) or 'nothing'}"
        elif names:
            composed = compose_hydra(names, conf_dir=conf_dir)
            source = f"{base_file} + {' + '.join(names)}"
        else:  # the default: params.yaml's own text (with its comments), kept in conf/base.yaml
            text = default_text(base_file)
            _validate(yaml.safe_load(text), str(base_file))
            write_text(out, text)
            console.print(f"wrote {out} = the default params ({base_file})")
            return
        _validate(composed, source)
    except KeyError as exc:  # str(KeyError) would wrap the message in quotes
        raise fail(str(exc.args[0])) from None
    except (OSError, yaml.YAMLError, ValueError) as exc:  # ParamsError and ProfileError are ValueErrors
        raise fail(str(exc)) from None
    header = (f"{COMPOSED_MARK} {' '.join(names)}` = {source}.\n"
              "# Generated: `arpipe profile` restores the default; edit params.yaml only in its default form.\n")
    write_text(out, header + dump(composed))
    console.print(f"wrote {out} = {source}")


def _validate(raw: object, source: str) -> None:
    """The params every stage would accept: the schema, then what only the registries know."""
    from pipeline_lib.registered import check_registered   # the registries import torch

    check_registered(parse_params(raw, source), source)


def _sync(params_file: Path, base_file: Path) -> None:
    """params.yaml -> conf/base.yaml, refusing a params.yaml that a profile composed."""
    text = params_file.read_text(encoding="utf-8")
    if text.startswith(COMPOSED_MARK):
        raise ValueError(f"{params_file} was composed by `arpipe profile` ({text.splitlines()[0][2:]}); restore "
                         "the default first (`arpipe profile` or git), then edit and sync")
    raw = yaml.safe_load(text)
    _validate(raw, str(params_file))
    if not base_file.exists():
        write_text(base_file, base_text(text))
        console.print(f"created {base_file} from {params_file}")
        return
    changed = drift(yaml.safe_load(default_text(base_file)) or {}, raw, ("was", "now"))
    write_text(base_file, base_text(text))
    console.print(f"wrote {base_file} from {params_file}: "
                  + (f"{len(changed)} key(s) changed" if changed else "no value changed"), soft_wrap=True)
    for line in changed:
        console.print(f"  {line}", soft_wrap=True, markup=False)


def _check(params_file: Path, conf_dir: Path) -> None:
    with open(params_file, encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    try:
        composed = compose_hydra([], conf_dir=conf_dir)
    except ProfileError as exc:
        raise fail(str(exc)) from None
    diff = drift(params, composed)
    if diff:
        console.print(f"[bold red]drift[/]: {conf_dir} composes to something else than {params_file} "
                      f"({len(diff)} key(s)); run `arpipe profile --sync`", soft_wrap=True)
        for line in diff:
            console.print(f"  {line}", soft_wrap=True, markup=False)
        raise typer.Exit(1)
    console.print(f"{conf_dir} composes to {params_file}: in sync")
