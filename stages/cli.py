"""The `arpipe` command: one subcommand per DVC stage (see dvc.yaml)."""

from __future__ import annotations

import sys

from pipeline_lib.numerics import apply_from_argv

# A stage process pins the CPU kernels (runtime.numerics) before anything imports torch; when
# torch is already loaded (the command invoked in-process, e.g. by a test) its caller chose.
if "torch" not in sys.modules:
    apply_from_argv(sys.argv)

import typer  # noqa: E402

# Each stage module imports its share of the library inside its command, so a stage process
# loads only what it runs (importing everything cost every stage ~5 s).
from . import aggregate, corruption, evaluate, profile, train  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Accuracy-robustness pipeline stages. Normally run by `dvc repro`.")


@app.callback()
def main() -> None:
    """Stages of the ARREST / AR-AT / CURE comparison pipeline."""


app.command("pretrain")(train.pretrain)
app.command("finetune")(train.finetune)
app.command("evaluate")(evaluate.evaluate)
app.command("profile")(profile.profile)
app.command("corrupt")(corruption.corrupt)
app.command("corruption")(corruption.corruption)
app.command("aggregate")(aggregate.aggregate)
app.command("gate")(aggregate.gate)

if __name__ == "__main__":
    app()
