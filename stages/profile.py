"""`arpipe profile`: generate params.yaml from conf/ (the source) for `dvc repro`.

    arpipe profile                           the default params.yaml (conf/base.yaml, comments kept)
    arpipe profile cifar10_resnet18          conf/base.yaml + the profile (Hydra's compose, as
                                             `dvc exp run -S profile=cifar10_resnet18` does), validated
    arpipe profile cifar10_wrn34_10 gpu_fast several profiles, applied in order
    arpipe profile --list                    the profiles and what each is for
    arpipe profile --check                   exit 1 if params.yaml is not what conf/ generates
                                             (edited by hand: move the edit to conf/)
    arpipe profile ci --base my.yaml         overlay onto another params file (plain merge, no Hydra)
"""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from pipeline_lib.config import parse_params
from pipeline_lib.io import check_writable, write_text
from pipeline_lib.profiles import (BASE_NAME, COMPOSED_MARK, CONF_DIR, PARAMS_FILE, PROFILE_DIR, ProfileError,
                                   available, compose, compose_hydra, default_params_text, describe, drift, dump,
                                   generated_from)

from .common import console, fail


def profile(
    names: list[str] = typer.Argument(None, help="profile(s) from conf/profile, applied in order; none = the default"),
    out: Path = typer.Option(PARAMS_FILE, help="where to write the composed params"),
    conf_dir: Path = typer.Option(CONF_DIR, help="Hydra config folder (config.yaml, base.yaml, profile/)"),
    base: Path | None = typer.Option(None, help="overlay onto this params file instead of conf/base.yaml (no Hydra)"),
    profile_dir: Path = typer.Option(PROFILE_DIR, help="folder of profile overlays (with --base)"),
    list_: bool = typer.Option(False, "--list", help="list the profiles and exit"),
    check: bool = typer.Option(False, "--check", help="exit 1 when params.yaml (--out) is not what conf/ generates"),
) -> None:
    """Generate params.yaml from conf/ for the default or a profile (validated first), or check it."""
    names = names or []
    base_file = conf_dir / f"{BASE_NAME}.yaml"
    try:
        if list_:
            for name in available(conf_dir / "profile"):
                console.print(f"{name:<20} {describe(name, conf_dir / 'profile')}", soft_wrap=True, markup=False)
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
        else:  # the default: conf/base.yaml's text, comments kept
            text = default_params_text(base_file)
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
              "# Generated from conf/: edit conf/ (the source), not this file; `arpipe profile` restores the default.\n")
    write_text(out, header + dump(composed))
    console.print(f"wrote {out} = {source}")


def _validate(raw: object, source: str) -> None:
    """The params every stage would accept: the schema, then what only the registries know."""
    from pipeline_lib.registered import check_registered

    check_registered(parse_params(raw, source), source)


def _check(params_file: Path, conf_dir: Path) -> None:
    text = params_file.read_text(encoding="utf-8")
    names = generated_from(text)
    try:
        composed = compose_hydra(names or [], conf_dir=conf_dir)
    except (ProfileError, KeyError) as exc:
        raise fail(str(exc.args[0] if isinstance(exc, KeyError) else exc)) from None
    what = f"conf/ + {' + '.join(names)}" if names else "the default (conf/base.yaml)"
    diff = drift(yaml.safe_load(text), composed, ("params.yaml", "conf"))
    if names == [] and not diff and text != default_params_text(conf_dir / f"{BASE_NAME}.yaml"):
        diff = ["the values agree but the text (comments) differs from conf/base.yaml's"]
    if names is None or diff:
        why = ("its first line is not the generated header (written by hand or by `dvc exp run`)"
               if names is None else f"it differs from {what} in {len(diff)} place(s)")
        console.print(f"[bold red]drift[/]: {params_file} is not what conf/ generates: {why}. Move edits to "
                      f"conf/ (the source) and run `arpipe profile [NAME...]`", soft_wrap=True)
        for line in diff:
            console.print(f"  {line}", soft_wrap=True, markup=False)
        raise typer.Exit(1)
    console.print(f"{params_file} = {what}: in sync")
