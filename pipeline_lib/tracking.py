"""MLflow logging that can never cost the pipeline its outputs.

Stages write their DVC outputs first-class; MLflow is a mirror for comparing
runs in the UI. Every MLflow call goes through `Tracker`, which turns a failure
(no store, locked sqlite, import error) into one warning and carries on.

Store: $MLFLOW_TRACKING_URI if set, else `sqlite:///<project root>/mlflow.db`
(MLflow >= 3.13 refuses a ./mlruns file store). Runs of one pipeline land in one
experiment; the tags `stage`, `method` and `group` let the UI line methods up.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


def default_tracking_uri(root: str | Path = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def git_commit(root: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """Context manager around one MLflow run. Disabled (all calls no-ops) after any failure."""

    def __init__(self, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
                 enabled: bool = True, root: str | Path = ".", nested: bool = False) -> None:
        self.experiment = experiment
        self.run_name = run_name
        self.tags = {"git_commit": git_commit(root), **(tags or {})}
        self.enabled = enabled and os.environ.get("ARPIPE_MLFLOW", "1") != "0"
        self.root = Path(root)
        self.nested = nested  # a child of the run active when it starts (see `child`)
        self._mlflow: Any = None
        self.run_id: str | None = None

    def _fail(self, what: str, exc: BaseException) -> None:
        warnings.warn(f"MLflow {what} failed ({type(exc).__name__}: {exc}); outputs are still written, "
                      "MLflow logging is off for the rest of this stage", RuntimeWarning, stacklevel=3)
        self.enabled = False

    def __enter__(self) -> Tracker:
        if not self.enabled:
            return self
        try:
            import mlflow

            logging.getLogger("alembic").setLevel(logging.WARNING)
            mlflow.set_tracking_uri(default_tracking_uri(self.root))
            if mlflow.get_experiment_by_name(self.experiment) is None:
                mlflow.create_experiment(self.experiment,
                                         artifact_location=(self.root.resolve() / "mlartifacts").as_uri())
            mlflow.set_experiment(self.experiment)
            run = mlflow.start_run(run_name=self.run_name, tags=self.tags, nested=self.nested)
            self._mlflow = mlflow
            self.run_id = run.info.run_id
        except Exception as exc:  # noqa: BLE001 - any failure must only disable logging
            self._fail("start", exc)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._mlflow is None or self.run_id is None:
            return
        # End the run even when a logging failure turned logging off: a run left open stays
        # RUNNING in the UI and stays the active run of this process (the next run would nest in it).
        try:
            self._mlflow.end_run(status="FAILED" if et else "FINISHED")
        except Exception as exc:  # noqa: BLE001
            if self.enabled:
                self._fail("end_run", exc)

    def child(self, run_name: str, tags: Mapping[str, str] | None = None) -> Tracker:
        """A nested run under this one, to enter while this one is active (the UI groups children
        under their parent). Off whenever this tracker is off, so a failed parent logs nothing more."""
        return Tracker(self.experiment, run_name, tags={**self.tags, **(tags or {})},
                       enabled=self.enabled and self._mlflow is not None, root=self.root, nested=True)

    def _call(self, what: str, fn_name: str, *args: Any, **kwargs: Any) -> None:
        if not self.enabled or self._mlflow is None:
            return
        try:
            getattr(self._mlflow, fn_name)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self._fail(what, exc)

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        self._call("log_params", "log_params", flat)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        nums = {k.replace("@", "_"): float(v) for k, v in flatten(metrics).items()
                if isinstance(v, int | float) and not isinstance(v, bool)}
        if nums:
            self._call("log_metrics", "log_metrics", nums, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call("set_tags", "set_tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._call("log_artifact", "log_artifact", str(path), artifact_path=artifact_path)
