"""`arpipe validate`: the first DVC stage. It checks the whole params file before any other stage runs.

`dvc repro` deletes a stage's previous outputs before the stage command starts, so a stage that
validates its own params can only fail after its models or metrics are gone. This stage depends on
every key of params.yaml (an unknown top-level key included) and every other stage depends on its
output, so DVC runs it first and stops at its error with every previous output in place.

Its output says only that validation passed. Its bytes never change with the params: DVC compares
dependency hashes, so a re-run of this stage alone re-runs nothing downstream.
"""

from __future__ import annotations

from pathlib import Path

import typer

from .common import PARAMS_OPTION, console, fail, load_or_exit

STAMP = b"params validated: every stage of dvc.yaml reads params that passed `arpipe validate`\n"


def validate(
    out: Path = typer.Option(..., help="stamp file to write when the params are valid (constant content)"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Validate the whole params file and the cross-checks the stages make before their work."""
    from pipeline_lib.aggregation.references import published_points
    from pipeline_lib.data import get_spec
    from pipeline_lib.evaluation.config import EvaluateConfigError, check_against
    from pipeline_lib.io import atomic_write

    p = load_or_exit(params)
    try:   # what evaluate@ and aggregate check before their work, so they fail here instead
        check_against(p.evaluate, dataset=p.data.dataset, num_classes=get_spec(p.data.dataset).num_classes,
                      eps=p.threat.eps)
        if p.aggregate.reference == "published":
            published_points(p.aggregate.published_table, p.aggregate.reference_models, p.aggregate.published_sources)
    except (EvaluateConfigError, ValueError) as exc:
        raise fail(f"invalid params in {params}: {exc}") from None
    atomic_write(out, lambda fh: fh.write(STAMP))
    console.print(f"validate: {params} is valid ({len(p.finetune.methods)} finetune methods, "
                  f"{len(p.evaluate.models)} evaluated models)")
