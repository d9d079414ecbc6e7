"""MLflow mirror: a real sqlite store receives each stage's run; no MLflow failure costs a stage its outputs.

A fresh sqlite store takes seconds to migrate, so the tests share one store (one experiment each).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from datafiles import REPO, tiny_params, write_fashion_mnist
from pipeline_lib import checkpoint
from pipeline_lib.config import Params
from pipeline_lib.io import read_json
from pipeline_lib.tracking import HTTP_DEFAULTS, RUNS_DIR, Tracker, flatten
from pipeline_lib.training import TrainOutputs, pretrain_job
from stages.train import train


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fashion_mnist(root, n_train=128, n_test=64)
    return root


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stages run in the project root: artifacts and relative paths land here, not in the repo."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _mlflow_on(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    monkeypatch.setenv("ARPIPE_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for key in HTTP_DEFAULTS:   # the Tracker sets its defaults in os.environ: undo them after the test
        monkeypatch.delenv(key, raising=False)


def _mlflow_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "MLflow" in r.getMessage()]


def _train(p: Params, d: Path) -> tuple[TrainOutputs, dict[str, Any]]:
    out = TrainOutputs(d / "models" / "standard.pt", d / "metrics" / "standard.json", d / "metrics" / "history.csv",
                       d / "cache" / "state.pt")
    return out, train(p, pretrain_job(p.pretrain.optim, p.threat), out)


def _assert_outputs(out: TrainOutputs, metrics: dict[str, Any]) -> None:
    assert read_json(out.metrics) == metrics
    assert out.history.read_text().startswith("epoch,")
    checkpoint.load_model(out.checkpoint)


def test_a_stage_logs_its_run_to_the_store(store_uri: str, data_root: Path, workdir: Path,
                                           monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    _mlflow_on(monkeypatch, store_uri)
    p = tiny_params(data_root, mlflow={"experiment": "logs-a-run"})
    out, metrics = _train(p, workdir)
    _assert_outputs(out, metrics)
    assert _mlflow_warnings(caplog) == []

    client = MlflowClient(store_uri)
    experiment = client.get_experiment_by_name("logs-a-run")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    assert run.data.tags["dvc_stage"] == "pretrain" and run.data.tags["method"] == "standard"
    assert run.data.tags["checkpoint_sha256"] == checkpoint.file_sha256(out.checkpoint)
    job = pretrain_job(p.pretrain.optim, p.threat)
    assert run.data.params["optim.lr"] == str(job.optim.lr)
    assert run.data.params["data.dataset"] == p.data.dataset
    assert run.data.metrics["val_clean_acc"] == pytest.approx(metrics["val_clean_acc"])
    per_epoch = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in per_epoch) == list(range(1, job.optim.epochs + 1))   # one point per epoch
    assert not (workdir / RUNS_DIR / "pretrain.json").exists()   # finished: no run left to continue
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {out.metrics.name, out.history.name} <= artifacts


def test_unusable_store_warns_and_outputs_are_still_written(data_root: Path, workdir: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    blocker = workdir / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    _mlflow_on(monkeypatch, f"sqlite:///{blocker / 'mlflow.db'}")
    p = tiny_params(data_root)
    out, metrics = _train(p, workdir)
    _assert_outputs(out, metrics)
    [warning] = _mlflow_warnings(caplog)
    assert "MLflow start failed" in warning and "outputs are still written" in warning and "\n" not in warning


def test_read_only_store_gives_one_line_not_a_traceback(store_uri: str, workdir: Path,
                                                         monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    """A store that cannot be written (sqlite's read-only mode: root ignores file permissions) made
    MLflow log SQLAlchemy's whole traceback (~90 lines) before the Tracker's warning."""
    with Tracker("read-only", "stage", root=workdir):   # the experiment exists: the failure is the run insert
        pass
    _mlflow_on(monkeypatch, f"sqlite:///file:{store_uri.removeprefix('sqlite:///')}?mode=ro&uri=true")
    capfd.readouterr()
    with Tracker("read-only", "stage", root=workdir) as tracker:
        tracker.log_metrics({"acc": 1.0})
    assert not tracker.enabled
    printed = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(printed) == 1 and "readonly database" in printed[0] and "\n" not in printed[0], printed
    assert "Traceback" not in capfd.readouterr().err   # MLflow's own stderr handler stayed quiet


def test_dead_tracking_server_is_given_up_in_seconds(data_root: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens on port 9 (discard): MLflow's default retries took 281 s before the stage went on."""
    _mlflow_on(monkeypatch, "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with Tracker("dead", "stage", root=workdir) as tracker:
        tracker.log_metrics({"acc": 1.0})
    assert time.perf_counter() - t0 < 30 and not tracker.enabled
    out, metrics = _train(tiny_params(data_root), workdir)
    _assert_outputs(out, metrics)
    assert len(_mlflow_warnings(caplog)) == 2   # one line per stage (the Tracker above, then the training)


KILL_AFTER_FIRST_EPOCH = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from datafiles import tiny_params
from pipeline_lib.training import TrainOutputs, loop, pretrain_job
from stages.train import train
saves = []
real_save = loop.checkpoint.save
def save_then_die(path, state):   # epoch 1's state is written and logged; SIGKILL while saving epoch 2's
    if saves:
        os.kill(os.getpid(), signal.SIGKILL)
    saves.append(path)
    real_save(path, state)
loop.checkpoint.save = save_then_die
p = tiny_params({root!r}, pretrain={{"optim": {{"epochs": 3, "milestones": [1]}}}}, mlflow={{"experiment": "killed"}})
train(p, pretrain_job(p.pretrain.optim, p.threat), TrainOutputs(*[__import__("pathlib").Path(x) for x in {outs!r}]))
"""


def test_killed_then_resumed_training_logs_each_epoch_once_in_one_run(store_uri: str, data_root: Path,
                                                                      workdir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    _mlflow_on(monkeypatch, store_uri)
    outs = [workdir / "models" / "standard.pt", workdir / "metrics" / "standard.json",
            workdir / "metrics" / "history.csv", workdir / "cache" / "state.pt"]
    script = KILL_AFTER_FIRST_EPOCH.format(tests=str(REPO / "tests"), root=str(data_root), outs=[str(o) for o in outs])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=workdir, env=env, check=False,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]   # SIGKILL: no handler ran
    client = MlflowClient(store_uri)
    experiment = client.get_experiment_by_name("killed").experiment_id
    [killed] = client.search_runs([experiment])
    assert killed.info.status == "RUNNING" and outs[3].exists() and not outs[0].exists()

    p = tiny_params(data_root, pretrain={"optim": {"epochs": 3, "milestones": [1]}}, mlflow={"experiment": "killed"})
    out = TrainOutputs(*outs)
    metrics = train(p, pretrain_job(p.pretrain.optim, p.threat), out)
    _assert_outputs(out, metrics)
    [run] = client.search_runs([experiment])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    for key in ("train_loss", "val_clean_acc"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3], key


def test_a_run_that_cannot_be_resumed_is_closed_as_killed(store_uri: str, workdir: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The stage was killed, then re-run with other params (its resume state no longer applies)."""
    from mlflow.tracking import MlflowClient

    _mlflow_on(monkeypatch, store_uri)
    first = Tracker("replaced", "finetune@x", root=workdir, resume_key="params-1").__enter__()
    first.wait_started()   # never exited, as after a SIGKILL: the run RUNNING in the store, the marker on disk
    assert MlflowClient(store_uri).get_run(first.run_id).info.status == "RUNNING"
    with Tracker("replaced", "finetune@x", root=workdir, resume_key="params-2") as second:
        pass
    old = MlflowClient(store_uri).get_run(first.run_id)
    assert not second.resumed and second.run_id != first.run_id
    assert old.info.status == "KILLED" and old.data.tags["arpipe.replaced_by"] == second.run_id
    assert any(first.run_id in m and second.run_id in m for m in _mlflow_warnings(caplog))


def test_failure_mid_run_warns_once_and_ends_the_run(store_uri: str, data_root: Path, workdir: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    _mlflow_on(monkeypatch, store_uri)
    real_log_batch = MlflowClient.log_batch

    def broken_metrics(self: MlflowClient, run_id: str, metrics: Any = (), **kwargs: Any) -> None:
        if metrics:
            raise ConnectionError("store went away")
        real_log_batch(self, run_id, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", broken_metrics)
    p = tiny_params(data_root, mlflow={"experiment": "fails-mid-run"})
    out, metrics = _train(p, workdir)
    failures = _mlflow_warnings(caplog)
    assert len(failures) == 1 and "log_metrics failed" in failures[0]
    _assert_outputs(out, metrics)
    client = MlflowClient(store_uri)   # the run was still closed, not left RUNNING
    runs = client.search_runs([client.get_experiment_by_name("fails-mid-run").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_switched_off_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    monkeypatch.setenv("ARPIPE_MLFLOW", "0")
    with Tracker("x", "stage", root=tmp_path) as tracker:
        tracker.log_metrics({"a": 1.0})
    assert not tracker.enabled and tracker.run_id is None
    assert not (tmp_path / "never.db").exists()


def test_tracker_flattens_params_and_keeps_numeric_metrics(store_uri: str, workdir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    _mlflow_on(monkeypatch, store_uri)
    with Tracker("flatten", "stage", root=workdir) as tracker:
        tracker.log_params({"optim": {"lr": 0.1, "milestones": [1, 2]}, "name": "pgd_at"})
        tracker.log_metrics({"acc": 0.5, "epochs": 3, "flag": True, "note": "text", "eval": {"pgd@20": 0.25}})
    run = MlflowClient(store_uri).get_run(tracker.run_id)
    assert run.data.params == {"optim.lr": "0.1", "optim.milestones": "[1, 2]", "name": "pgd_at"}
    assert run.data.metrics == {"acc": 0.5, "epochs": 3.0, "eval.pgd_20": 0.25}


def test_mlflow_start_is_off_the_stages_critical_path(store_uri: str, workdir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Entering the tracker and logging return while MLflow is still starting (its import and store
    take seconds); the calls are made in order once the run exists, and exit waits for all of them."""
    import threading

    from mlflow.tracking import MlflowClient

    _mlflow_on(monkeypatch, store_uri)
    release = threading.Event()
    real_start = Tracker._start

    def slow_start(self: Tracker) -> None:
        assert release.wait(timeout=60)
        real_start(self)

    monkeypatch.setattr(Tracker, "_start", slow_start)
    with Tracker("background", "stage", root=workdir) as tracker:
        for step in (1, 2, 3):                     # returns although no run exists yet
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        assert tracker._started is not None and not tracker._started.done()
        release.set()
    assert tracker._started.done()
    history = MlflowClient(store_uri).get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert MlflowClient(store_uri).get_run(tracker.run_id).info.status == "FINISHED"


def test_flatten() -> None:
    assert flatten({"a": {"b": {"c": 1}}, "d": [1]}) == {"a.b.c": 1, "d": [1]}


def test_the_store_of_a_dvc_queue_workspace_is_the_repositorys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc queue start` runs each experiment in <repo>/.dvc/tmp/exps/<run>/<copy>, deleted afterwards:
    the store and the artifacts belong to <repo> (from DVC_ROOT, which DVC sets, or the path)."""
    from pipeline_lib.tracking import default_tracking_uri, project_root

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "run" / "tmpabc123"
    copy.mkdir(parents=True)
    assert project_root(copy) == repo.resolve()
    assert default_tracking_uri(copy) == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    assert project_root(repo) == repo.resolve()       # an ordinary workspace is its own root
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "elsewhere"))
    assert project_root(copy) == (tmp_path / "elsewhere").resolve()
    assert project_root(repo) == repo.resolve()       # DVC_ROOT counts only inside a queue copy


@pytest.mark.parametrize(("stage", "sampled"), [("evaluate", True), ("aggregate", False)])
def test_training_and_evaluation_runs_log_system_metrics(store_uri: str, workdir: Path,
                                                          monkeypatch: pytest.MonkeyPatch, stage: str,
                                                          sampled: bool) -> None:
    """MLflow's background monitor (psutil) samples CPU and memory in the compute stages' runs only."""
    from mlflow.tracking import MlflowClient

    _mlflow_on(monkeypatch, store_uri)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with Tracker(f"system-{stage}", stage, tags={"stage": stage}, root=workdir) as tracker:
        time.sleep(1.5)   # several sampling intervals of the monitor thread
    metrics = MlflowClient(store_uri).get_run(tracker.run_id).data.metrics
    assert ("system/cpu_utilization_percentage" in metrics) is sampled
    assert ("system/system_memory_usage_megabytes" in metrics) is sampled
