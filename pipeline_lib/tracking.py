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
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
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


def ensure_experiment(client: Any, name: str, root: str | Path = ".") -> str:
    """The id of experiment `name`, created with its artifacts under `<project root>/mlartifacts`.
    `client`: an MlflowClient (or the `mlflow` module, whose fluent functions have the same names)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    return str(client.create_experiment(name, artifact_location=(project_root(root) / "mlartifacts").as_uri()))


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
    """Context manager around one MLflow run, driven from a background thread.

    Importing MLflow and opening its store take seconds (~3 s and ~2 s on a 2-core CPU): a stage
    that waited for them would start its first batch that much later. `__enter__` returns at once;
    one worker thread imports MLflow, opens the store, starts the run, then makes every logging
    call in the order the stage made them (by run id through `MlflowClient`: MLflow's fluent
    active run is thread-local). `__exit__` ends the run and waits for the worker, so everything
    logged is in the store when the stage returns. Values are captured when the call is made.
    Disabled (all calls no-ops) after any failure, with one warning.

    `resume_key`: what the stage's resumable state is keyed by (its fingerprint). A run with the
    key of the interrupted run in `cache/mlflow_runs/` continues that run (`resumed`) and logs
    only the (metric, step) points that run does not hold yet; with another key or none, the
    interrupted run is closed as KILLED (see the module docstring).
    """

    def __init__(self, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
                 enabled: bool = True, root: str | Path = ".", resume_key: str | None = None) -> None:
        self.experiment = experiment
        self.run_name = run_name
        self.tags = {"git_commit": git_commit(root), **(tags or {})}
        self.enabled = enabled and os.environ.get("ARPIPE_MLFLOW", "1") != "0"
        self.root = Path(root)
        self.resume_key = resume_key
        self._client: Any = None          # MlflowClient of the store, once the worker has opened it
        self._run_id: str | None = None
        self._resumed = False
        self._monitor: Any = None         # MLflow's system-metrics sampler of this run, if any
        self._held: dict[str, set[int]] = {}   # resumed run: steps each metric already has in the store
        self._worker: ThreadPoolExecutor | None = None
        self._started: Future[None] | None = None

    @property
    def marker(self) -> Path:
        """Where the run id of this stage's unfinished run is kept."""
        return self.root / RUNS_DIR / f"{self.run_name}.json"

    def wait_started(self) -> None:
        """Block until the worker has started the run (or failed to)."""
        if self._started is not None:
            self._started.result()

    @property
    def run_id(self) -> str | None:
        self.wait_started()
        return self._run_id

    @property
    def resumed(self) -> bool:
        """This run continues the run of an interrupted invocation of the stage."""
        self.wait_started()
        return self._resumed

    def _fail(self, what: str, exc: BaseException) -> None:
        log.warning("MLflow %s failed (%s); outputs are still written, MLflow logging is off for the rest "
                    "of %s", what, first_line(exc), self.run_name)
        self.enabled = False

    def _submit(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        """Queue `fn(*args)` on the worker, after the run has started; a failure disables logging."""
        if not self.enabled or self._worker is None:
            return

        def task() -> None:
            if not self.enabled or self._client is None:
                return
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - any failure must only disable logging
                self._fail(what, exc)

        self._worker.submit(task)

    def __enter__(self) -> Tracker:
        if self.enabled:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arpipe-mlflow")
            self._started = self._worker.submit(self._start)
        return self

    def _start(self) -> None:
        try:
            quiet_mlflow()
            from mlflow.tracking import MlflowClient
            from mlflow.tracking.context.registry import resolve_tags

            uri = default_tracking_uri(self.root)
            client = MlflowClient(uri)
            experiment_id = ensure_experiment(client, self.experiment, self.root)
            interrupted = self._interrupted_run(client, uri)
            if interrupted is not None and self.resume_key is not None and interrupted.get("key") == self.resume_key:
                run_id = interrupted["run_id"]
                client.update_run(run_id, status="RUNNING")
                client.log_batch(run_id, tags=_run_tags(self.tags))
                self._resumed = True
            else:
                # The tags MLflow's fluent start_run adds (user, source), then the run name and ours.
                tags = resolve_tags({"mlflow.runName": self.run_name, **self.tags})
                run_id = client.create_run(experiment_id, tags=tags, run_name=self.run_name).info.run_id
                if interrupted is not None:
                    self._close_replaced(client, interrupted["run_id"], run_id)
            self._client, self._run_id = client, run_id
            from .io import write_json

            write_json(self.marker, {"run_id": run_id, "tracking_uri": uri, "key": self.resume_key})
            if self.tags.get("stage") in SYSTEM_METRICS_STAGES and _has_psutil():
                os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", SYSTEM_METRICS_INTERVAL_S)
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(run_id, resume_logging=self._resumed, tracking_uri=uri)
                self._monitor.start()
        except Exception as exc:  # noqa: BLE001 - any failure must only disable logging
            self._fail("start", exc)

    def _interrupted_run(self, client: Any, uri: str) -> dict[str, Any] | None:
        """The marker of this stage's unfinished run when that run is still in this store, else None."""
        try:
            found = json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(found, dict) or found.get("tracking_uri") != uri:
            return None
        try:
            run = client.get_run(found["run_id"])
        except Exception:  # noqa: BLE001 - deleted or never stored: nothing to continue or close
            return None
        return found if run.info.lifecycle_stage == "active" else None

    def _close_replaced(self, client: Any, old: str, new: str) -> None:
        if client.get_run(old).info.status == "RUNNING":
            client.set_terminated(old, status="KILLED")
        client.set_tag(old, "arpipe.replaced_by", new)
        log.warning("MLflow: run %s of an interrupted %s cannot be continued (its resume state is gone or "
                    "belongs to other params): closed as KILLED, run %s replaces it", old, self.run_name, new)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._worker is None:
            return
        # End the run even when a logging failure turned logging off: a run left open stays RUNNING
        # in the UI. Ctrl-C ends it KILLED; the marker stays until the stage finishes, so a resume
        # continues it.
        status = "FINISHED" if et is None else "KILLED" if issubclass(et, KeyboardInterrupt) else "FAILED"
        self._worker.submit(self._end, status)
        self._worker.shutdown(wait=True)
        self._worker = None
        if et is None and self._run_id is not None:
            self.marker.unlink(missing_ok=True)

    def _end(self, status: str) -> None:
        if self._client is None or self._run_id is None:
            return
        try:
            if self._monitor is not None:
                self._monitor.finish()
            self._client.set_terminated(self._run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            if self.enabled:
                self._fail("end_run", exc)

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        if flat:
            self._submit("log_params", self._log_params, flat)

    def _log_params(self, flat: dict[str, str]) -> None:
        from mlflow.entities import Param

        if self._resumed:   # a continued run keeps the params it holds (MLflow refuses to change one)
            held = self._client.get_run(self._run_id).data.params
            flat = {k: v for k, v in flat.items() if k not in held}
        if flat:
            self._client.log_batch(self._run_id, params=[Param(k, v) for k, v in flat.items()])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        nums = {k.replace("@", "_"): float(v) for k, v in flatten(metrics).items()
                if isinstance(v, int | float) and not isinstance(v, bool)}
        if nums:
            self._submit("log_metrics", self._log_metrics, nums, step or 0, int(time.time() * 1000))

    def _log_metrics(self, nums: dict[str, float], step: int, timestamp: int) -> None:
        from mlflow.entities import Metric

        if self._resumed:   # fit replays the epochs a resumed run holds: log each point once
            nums = {k: v for k, v in nums.items() if step not in self._held_steps(k)}
        if nums:
            self._client.log_batch(self._run_id, metrics=[Metric(k, v, timestamp, step) for k, v in nums.items()])

    def _held_steps(self, key: str) -> set[int]:
        if key not in self._held:
            self._held[key] = {m.step for m in self._client.get_metric_history(self._run_id, key)}
        return self._held[key]

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._submit("set_tags", lambda t: self._client.log_batch(self._run_id, tags=_run_tags(t)), dict(tags))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._submit("log_artifact", lambda: self._client.log_artifact(self._run_id, str(path), artifact_path))


def _run_tags(tags: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in tags.items()]
