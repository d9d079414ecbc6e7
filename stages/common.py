"""What every stage command shares: params loading with a clean error exit, and logging setup."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

from pipeline_lib.config import Params, ParamsError, load_params

console = Console(stderr=True)

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", "-p", help="params file (DVC's params.yaml)")


def load_or_exit(path: Path) -> Params:
    """Validate the params file before any work; print the named bad values and exit 2 on error."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return load_params(path)
    except ParamsError as exc:
        console.print(f"[bold red]invalid params[/]: {exc}")
        raise typer.Exit(2) from None


def fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error[/]: {message}")
    return typer.Exit(2)
