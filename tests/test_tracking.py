"""MLflow mirror: a real sqlite store receives each stage's run; no MLflow failure costs a stage its outputs.

A fresh sqlite store takes seconds to migrate, so the tests share one store (one experiment each).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from datafiles import tiny_params, write_fashion_mnist
from pipeline_lib import checkpoint
from pipeline_lib.config import Params
from pipeline_lib.io import read_json
from pipeline_lib.tracking import Tracker, flatten
from pipeline_lib.training import TrainOutputs, pretrain_job, run_training


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


def _train(p: Params, d: Path) -> tuple[TrainOutputs, dict[str, Any]]:
    out = TrainOutputs(d / "models" / "standard.pt", d / "metrics" / "standard.json", d / "metrics" / "history.csv",
                       d / "cache" / "state.pt")
    return out, run_training(p, pretrain_job(p), out)


def _assert_outputs(out: TrainOutputs, metrics: dict[str, Any]) -> None:
    assert read_json(out.metrics) == metrics
    assert out.history.read_text().startswith("epoch,")
    checkpoint.load_model(out.checkpoint)


def test_a_stage_logs_its_run_to_the_store(store_uri: str, data_root: Path, workdir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    _mlflow_on(monkeypatch, store_uri)
    p = tiny_params(data_root, mlflow={"experiment": "logs-a-run"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)     # no MLflow failure warning
        out, metrics = _train(p, workdir)
    _assert_outputs(out, metrics)

    client = MlflowClient(store_uri)
    experiment = client.get_experiment_by_name("logs-a-run")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    assert run.data.tags["dvc_stage"] == "pretrain" and run.data.tags["method"] == "standard"
    assert run.data.tags["checkpoint_sha256"] == checkpoint.file_sha256(out.checkpoint)
    job = pretrain_job(p)
    assert run.data.params["optim.lr"] == str(job.optim.lr)
    assert run.data.params["data.dataset"] == p.data.dataset
    assert run.data.metrics["val_clean_acc"] == pytest.approx(metrics["val_clean_acc"])
    per_epoch = client.get_metric_history(run.info.run_id, "train_loss")
    assert {m.step for m in per_epoch} == set(range(1, job.optim.epochs + 1))   # one point per epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {out.metrics.name, out.history.name} <= artifacts


def test_unusable_store_warns_and_outputs_are_still_written(data_root: Path, workdir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = workdir / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    _mlflow_on(monkeypatch, f"sqlite:///{blocker / 'mlflow.db'}")
    p = tiny_params(data_root)
    with pytest.warns(RuntimeWarning, match="MLflow start failed.*outputs are still written"):
        out, metrics = _train(p, workdir)
    _assert_outputs(out, metrics)


def test_failure_mid_run_warns_once_and_ends_the_run(store_uri: str, data_root: Path, workdir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    _mlflow_on(monkeypatch, store_uri)

    def broken(*args: object, **kwargs: object) -> None:
        raise ConnectionError("store went away")

    monkeypatch.setattr(mlflow, "log_metrics", broken)
    p = tiny_params(data_root, mlflow={"experiment": "fails-mid-run"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, metrics = _train(p, workdir)
    failures = [w for w in caught if "MLflow" in str(w.message)]
    assert len(failures) == 1 and "log_metrics failed" in str(failures[0].message)
    _assert_outputs(out, metrics)
    # The run was still closed: not left RUNNING, and no longer the process's active run.
    assert mlflow.active_run() is None
    client = MlflowClient(store_uri)
    runs = client.search_runs([client.get_experiment_by_name("fails-mid-run").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_switched_off_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    monkeypatch.setenv("ARPIPE_MLFLOW", "0")
    with Tracker("x", "stage", root=tmp_path) as tracker:
        tracker.log_metrics({"a": 1.0})
    assert not tracker.enabled and tracker.run_id is None
    assert not (tmp_path / "never.db").exists()


class FakeMlflow:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self.calls.append((name, args[0] if args else kwargs))


def test_tracker_flattens_params_and_keeps_numeric_metrics() -> None:
    tracker = Tracker("x", "stage")
    fake = FakeMlflow()
    tracker.enabled, tracker._mlflow = True, fake
    tracker.log_params({"optim": {"lr": 0.1, "milestones": [1, 2]}, "name": "pgd_at"})
    tracker.log_metrics({"acc": 0.5, "epochs": 3, "flag": True, "note": "text", "eval": {"pgd@20": 0.25}})
    assert fake.calls[0] == ("log_params", {"optim.lr": "0.1", "optim.milestones": "[1, 2]", "name": "pgd_at"})
    assert fake.calls[1] == ("log_metrics", {"acc": 0.5, "epochs": 3.0, "eval.pgd_20": 0.25})


def test_flatten() -> None:
    assert flatten({"a": {"b": {"c": 1}}, "d": [1]}) == {"a.b.c": 1, "d": [1]}
