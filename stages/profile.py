"""`arpipe profile NAME`: write params composed from the current params and a profile overlay."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from pipeline_lib.config import ParamsError, parse_params
from pipeline_lib.io import write_text
from pipeline_lib.profiles import PROFILE_DIR, compose

from .common import console, fail


def profile(
    names: list[str] = typer.Argument(..., help="profile(s) from conf/profile, applied in order"),
    base: Path = typer.Option(Path("params.yaml"), help="params to start from"),
    out: Path = typer.Option(Path("params.yaml"), help="where to write the composed params"),
    profile_dir: Path = typer.Option(PROFILE_DIR, help="folder of profile overlays"),
) -> None:
    """Compose params.yaml with profile overlays (validated before writing)."""
    with open(base, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    try:
        composed = compose(raw, names, profile_dir)
        parse_params(composed, f"{base} + {'+'.join(names)}")
    except (KeyError, ValueError, ParamsError) as exc:
        raise fail(str(exc)) from None
    write_text(out, yaml.safe_dump(composed, sort_keys=False))
    console.print(f"wrote {out} = {base} + {' + '.join(names)}")
