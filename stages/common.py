"""What every stage command shares: params loading with a clean error exit, and logging setup."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from pipeline_lib.config import Params, ParamsError, load_params

console = Console(stderr=True)

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", "-p", help="params file (DVC's params.yaml)")
ALLOW_NAME_MISMATCH = typer.Option(False, "--allow-name-mismatch",
                                   help="evaluate a checkpoint trained as another method under NAME, on purpose")


def load_or_exit(path: Path, registries: bool = True) -> Params:
    """Validate the params file before any work; print the named bad values and exit 2 on error.

    `registries=False` skips the check against the model and objective registries (torch-free, as is
    the params schema): for `gate`, which reads no model or method params. Every other command makes the
    check (the aggregate logs each method's resolved params to MLflow, so a bad one must stop it before
    any work)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        p = load_params(path)
        if registries:
            from pipeline_lib.registered import check_registered

            check_registered(p, str(path))
        return p
    except ParamsError as exc:
        console.print(f"[bold red]invalid params[/]: {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `message` and return the exit-`code` exception to raise. The message is printed literally
    (a list like [standard, pgd_at] is not rich markup) and on one line (grep-able in CI logs)."""
    console.print(f"[bold red]error[/]: {escape(message)}", soft_wrap=True)
    return typer.Exit(code)
