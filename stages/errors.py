"""One line per error, for every `arpipe` command: the command group that turns exceptions into it.

    UserError (bad file / value / path)   ->  "error: <message>"                       exit 2
    OSError (EACCES, ENOSPC, ...)          ->  "error: <file>: <strerror>"               exit 2
    anything else (a bug)                 ->  "error: unexpected <Type>: <message> ..."  exit 1

`arpipe --debug` or ARPIPE_DEBUG=1 lets the exception through with its full traceback.
Typer's own exits, aborts and usage errors pass untouched.
"""

from __future__ import annotations

import os
from typing import Any

from typer.core import TyperGroup
from typer.exceptions import Abort, Exit, TyperException

from pipeline_lib.errors import UserError

from .common import fail

DEBUG_ENV = "ARPIPE_DEBUG"
DEBUG_KEY = "arpipe.debug"   # ctx.meta key set by the --debug option
MAX_UNEXPECTED = 300   # characters of an unexpected exception's message (some dump whole tensors)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def describe(exc: BaseException) -> tuple[str, int]:
    """(the one line, the exit code) for an exception that escaped a command."""
    if isinstance(exc, UserError):
        return one_line(str(exc)), 2
    if isinstance(exc, OSError):   # the environment: permissions, a full disk, a missing file
        named = exc.filename is not None and exc.strerror
        return (f"{exc.filename}: {exc.strerror}" if named else one_line(str(exc))), 2
    text = one_line(str(exc))
    if len(text) > MAX_UNEXPECTED:
        text = text[:MAX_UNEXPECTED] + " ..."
    return (f"unexpected {type(exc).__name__}: {text} (rerun with `arpipe --debug ...` or {DEBUG_ENV}=1 "
            "for the traceback)"), 1


class OneLineErrors(TyperGroup):
    """Typer group whose commands report an escaping exception as one line (see the module docstring)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (Exit, Abort, TyperException):
            raise
        except Exception as exc:
            if ctx.meta.get(DEBUG_KEY) or debug_enabled():
                raise
            raise fail(*describe(exc)) from None
