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
from . import aggregate, corruption, evaluate, import_model, profile, train, validate  # noqa: E402
from .errors import DEBUG_ENV, DEBUG_KEY, OneLineErrors  # noqa: E402

app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Accuracy-robustness pipeline stages. Normally run by `dvc repro`.")


@app.callback()
def main(ctx: typer.Context,
         debug: bool = typer.Option(False, "--debug", help=f"show full tracebacks (or set {DEBUG_ENV}=1)")) -> None:
    """Stages of the ARREST / AR-AT / CURE comparison pipeline."""
    ctx.meta[DEBUG_KEY] = debug   # read by OneLineErrors; torchrun-started processes get --debug in their argv


app.command("pretrain")(train.pretrain)
app.command("finetune")(train.finetune)
app.command("import-model")(import_model.import_model)
app.command("evaluate")(evaluate.evaluate)
app.command("profile")(profile.profile)
app.command("corrupt")(corruption.corrupt)
app.command("corruption")(corruption.corruption)
app.command("aggregate")(aggregate.aggregate)
app.command("gate")(aggregate.gate)
app.command("validate")(validate.validate)

if __name__ == "__main__":
    app()
