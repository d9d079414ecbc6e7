"""Thin Typer commands, one per DVC stage: read params, call pipeline_lib, write the paths dvc.yaml names."""
