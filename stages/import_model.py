"""`arpipe import-model NAME`: the `import@<name>` stage (one per entry of params' `external:`)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import PARAMS_OPTION, console, fail, load_or_exit


def import_model(
    name: str = typer.Argument(..., help="model name: a key of params' `external:` section"),
    out: Path = typer.Option(..., help="project checkpoint to write (models/<name>.pt)"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Turn a published checkpoint (state_dict or TorchScript) into a project checkpoint with provenance."""
    from pipeline_lib.external.importer import ImportModelError
    from pipeline_lib.external.importer import import_model as run_import

    p = load_or_exit(params)
    if name not in p.external:
        raise fail(f"unknown external model {name!r}; params' external section defines: "
                   f"{', '.join(sorted(p.external)) or 'none'}")
    try:
        meta = run_import(p.external[name], name, out)
    except ImportModelError as exc:
        raise fail(str(exc)) from None
    mapping = "; ".join(meta["key_mapping"]) or "none"
    console.print(f"import@{name}: {meta['source_path']} ({meta['source_format']}, sha256 "
                  f"{meta['source_sha256'][:12]}) -> {out}; key mapping: {mapping}")
