"""The error type for problems the user can fix (a bad file, value or path), as opposed to bugs.

Its message is one line that says what is wrong, which key / file / value, and what to do.
`arpipe` prints it alone and exits 2 (stages/cli.py); the traceback is shown only with
`arpipe --debug` or ARPIPE_DEBUG=1. Domain errors (ParamsError, CheckpointError,
DataUnavailableError, ...) derive from it, usually next to ValueError/RuntimeError so
callers that catch those keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's inputs or environment; the message is the whole report."""
