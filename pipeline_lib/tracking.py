"""MLflow logging that can never cost the pipeline its outputs.

Stages write their DVC outputs first-class; MLflow is a mirror for comparing
runs in the UI. Every MLflow call goes through `Tracker`, which turns a failure
(no store, locked sqlite, import error) into one warning and carries on.

Store: $MLFLOW_TRACKING_URI if set, else `sqlite:///<project root>/mlflow.db` and artifacts in
`<project root>/mlartifacts` (MLflow >= 3.13 refuses a ./mlruns file store). The project root is
the repository's own, also when DVC runs the stage in a temporary copy (`dvc exp run --queue` /
`dvc queue start` run each experiment in `.dvc/tmp/exps/...`, deleted afterwards): see
`project_root`. Runs of one pipeline land in one experiment; the tags `stage`, `method` and
`arpipe.execution` (tracking_layout.py) let the UI line methods and executions up. Training,
evaluation and corruption stage runs log MLflow system metrics (CPU, memory; GPU when present).

Run hygiene after a kill: a stage's run id is kept in `cache/mlflow_runs/<stage>.json` until the
stage finishes. A resumed stage (same resume key: the fingerprint of its resumable state)
continues that run and logs only the epochs it does not hold yet; a stage that cannot resume
closes the interrupted run as KILLED, tags it with the run that replaces it, and says so.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

# MLflow's HTTP defaults retry a tracking server that does not answer for minutes (7 retries,
# exponential backoff, 120 s timeout: 281 s measured on a dead port) before the stage goes on
# without tracking. Unless the user set them, a dead server is given up in seconds.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
# Loggers that print a store failure's whole traceback (MLflow logs SQLAlchemy errors with
# logger.exception before re-raising them): the Tracker's one warning line replaces them.
QUIET_LOGGERS = ("mlflow.store", "mlflow.tracking", "mlflow.utils.rest_utils", "sqlalchemy", "alembic", "urllib3")
RUNS_DIR = Path("cache") / "mlflow_runs"   # under the project root: run ids of unfinished stages
# Stages whose runs sample CPU / memory (and GPU with pynvml) in MLflow's background thread (psutil).
SYSTEM_METRICS_STAGES = frozenset({"pretrain", "finetune", "evaluate", "corruption"})
SYSTEM_METRICS_INTERVAL_S = "5"   # MLflow's default 10 s would miss most stages of the small profiles
EXPS_TMP = (".dvc", "tmp", "exps")  # where DVC's queue runs an experiment: a copy of the repository


def project_root(root: str | Path = ".") -> Path:
    """The repository that owns the MLflow store: `root` itself, except inside a temporary experiment
    workspace of DVC (`<repo>/.dvc/tmp/exps/<run>/<copy>`), which is deleted after the run. There DVC
    sets DVC_ROOT to the parent repository for every stage command (dvc/repo/experiments/queue/base.py);
    without it the path is cut at `.dvc/tmp/exps`."""
    here = Path(root).resolve()
    parts = here.parts
    for i in range(len(parts) - len(EXPS_TMP) + 1):
        if parts[i:i + len(EXPS_TMP)] == EXPS_TMP:
            dvc_root = os.environ.get("DVC_ROOT")
            return Path(dvc_root).resolve() if dvc_root else Path(*parts[:i])
    return here


def default_tracking_uri(root: str | Path = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


def ensure_experiment(mlflow: Any, name: str, root: str | Path = ".") -> str:
    """The id of experiment `name`, created with its artifacts under `<project root>/mlartifacts`."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    return str(mlflow.create_experiment(name, artifact_location=(project_root(root) / "mlartifacts").as_uri()))


def quiet_mlflow() -> None:
    """HTTP give-up defaults (the user's own settings win) and silent store loggers; call before MLflow."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters. SQLAlchemy's errors run over many
    lines (the SQL, its parameters): their cause is the line `(sqlite3.OperationalError) ...`."""
    text = [t for t in str(exc).strip().splitlines() if t.strip()]
    cause = next((t for t in text if re.match(r"\([\w.]+Error\) ", t)), text[0] if text else "")
    line = f"{type(exc).__name__}: {cause}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


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


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401 - MLflow's system metrics monitor needs it
    except ImportError:
        log.info("psutil is not installed: no system metrics in the MLflow runs")
        return False
    return True


class Tracker:
    """Context manager around one MLflow run. Disabled (all calls no-ops) after any failure.

    `resume_key`: what the stage's resumable state is keyed by (its fingerprint). A top-level run
    with the key of the interrupted run in `cache/mlflow_runs/` continues that run (`resumed`);
    with another key or none, the interrupted run is closed as KILLED (see the module docstring).
    """

    def __init__(self, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
                 enabled: bool = True, root: str | Path = ".", nested: bool = False,
                 resume_key: str | None = None) -> None:
        self.experiment = experiment
        self.run_name = run_name
        self.tags = {"git_commit": git_commit(root), **(tags or {})}
        self.enabled = enabled and os.environ.get("ARPIPE_MLFLOW", "1") != "0"
        self.root = Path(root)
        self.nested = nested  # a child of the run active when it starts (see `child`)
        self.resume_key = resume_key
        self._mlflow: Any = None
        self.run_id: str | None = None
        self.resumed = False   # this run continues the run of an interrupted invocation of the stage

    @property
    def marker(self) -> Path:
        """Where the run id of this stage's unfinished run is kept (top-level runs only)."""
        return self.root / RUNS_DIR / f"{self.run_name}.json"

    def _fail(self, what: str, exc: BaseException) -> None:
        log.warning("MLflow %s failed (%s); outputs are still written, MLflow logging is off for the rest "
                    "of %s", what, first_line(exc), self.run_name)
        self.enabled = False

    def __enter__(self) -> Tracker:
        if not self.enabled:
            return self
        try:
            quiet_mlflow()
            import mlflow

            uri = default_tracking_uri(self.root)
            mlflow.set_tracking_uri(uri)
            ensure_experiment(mlflow, self.experiment, self.root)
            mlflow.set_experiment(self.experiment)
            system = self.tags.get("stage") in SYSTEM_METRICS_STAGES and _has_psutil()
            if system:
                os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", SYSTEM_METRICS_INTERVAL_S)
            interrupted = None if self.nested else self._interrupted_run(mlflow, uri)
            if interrupted is not None and self.resume_key is not None and interrupted.get("key") == self.resume_key:
                run = mlflow.start_run(run_id=interrupted["run_id"], log_system_metrics=system)
                mlflow.set_tags(self.tags)
                self.resumed = True
            else:
                run = mlflow.start_run(run_name=self.run_name, tags=self.tags, nested=self.nested,
                                       log_system_metrics=system)
                if interrupted is not None:
                    self._close_replaced(mlflow, interrupted["run_id"], run.info.run_id)
            self._mlflow = mlflow
            self.run_id = run.info.run_id
            if not self.nested:
                from .io import write_json

                write_json(self.marker, {"run_id": self.run_id, "tracking_uri": uri, "key": self.resume_key})
        except Exception as exc:  # noqa: BLE001 - any failure must only disable logging
            self._fail("start", exc)
        return self

    def _interrupted_run(self, mlflow: Any, uri: str) -> dict[str, Any] | None:
        """The marker of this stage's unfinished run when that run is still in this store, else None."""
        try:
            found = json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(found, dict) or found.get("tracking_uri") != uri:
            return None
        try:
            run = mlflow.MlflowClient().get_run(found["run_id"])
        except Exception:  # noqa: BLE001 - deleted or never stored: nothing to continue or close
            return None
        return found if run.info.lifecycle_stage == "active" else None

    def _close_replaced(self, mlflow: Any, old: str, new: str) -> None:
        client = mlflow.MlflowClient()
        if client.get_run(old).info.status == "RUNNING":
            client.set_terminated(old, status="KILLED")
        client.set_tag(old, "arpipe.replaced_by", new)
        log.warning("MLflow: run %s of an interrupted %s cannot be continued (its resume state is gone or "
                    "belongs to other params): closed as KILLED, run %s replaces it", old, self.run_name, new)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._mlflow is None or self.run_id is None:
            return
        # End the run even when a logging failure turned logging off: a run left open stays
        # RUNNING in the UI and stays the active run of this process (the next run would nest in it).
        # Ctrl-C ends it KILLED; the marker stays until the stage finishes, so a resume continues it.
        status = "FINISHED" if et is None else "KILLED" if issubclass(et, KeyboardInterrupt) else "FAILED"
        try:
            self._mlflow.end_run(status=status)
        except Exception as exc:  # noqa: BLE001
            if self.enabled:
                self._fail("end_run", exc)
        if et is None and not self.nested:
            self.marker.unlink(missing_ok=True)

    def logged_steps(self, metric: str) -> set[int]:
        """Steps at which this run already holds `metric` (a resumed run logs only the others)."""
        if not self.enabled or self._mlflow is None or self.run_id is None:
            return set()
        try:
            return {m.step for m in self._mlflow.MlflowClient().get_metric_history(self.run_id, metric)}
        except Exception as exc:  # noqa: BLE001
            self._fail("get_metric_history", exc)
            return set()

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
        if self.resumed and self.enabled and self._mlflow is not None:
            # A continued run keeps the params it holds (MLflow refuses to change one, e.g. a runtime setting).
            try:
                held = self._mlflow.MlflowClient().get_run(self.run_id).data.params
            except Exception as exc:  # noqa: BLE001
                self._fail("get_run", exc)
                return
            flat = {k: v for k, v in flat.items() if k not in held}
        if flat:
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
