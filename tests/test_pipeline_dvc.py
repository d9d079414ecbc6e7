"""End to end: the real DVC pipeline on the tiny `ci` params in a temporary git repo.

One scenario (the pipeline runs once; every step builds on the previous state):

1. `dvc repro` runs every stage; each stage leaves a run in the MLflow store;
   `dvc metrics show` has clean and PGD accuracy for every evaluated model.
2. A second `dvc repro` runs nothing.
3. Changing one method's finetune lr re-runs that method's finetune and only what follows it.
4. Changing an evaluation param re-runs the evaluate stages (and what follows them), no training
   (checked with `dvc status` and `dvc repro --dry`, so the costly evaluate stages run only once).
5. Editing one method's module marks every finetune stage changed, never pretraining.

Expectations come from `dvc stage list` / `dvc dag` and params.yaml, not from a fixed stage
list, so the test keeps holding as stages and methods are added.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from datafiles import REPO, write_fashion_mnist
from pipeline_lib.data.sources import DEBIAN_FASHION_MNIST, FASHION_FILES

pytestmark = pytest.mark.slow

# What a checkout needs to run the pipeline (the code runs from the copy through PYTHONPATH).
PROJECT_FILES = ["pipeline_lib", "stages", "conf", "dvc.yaml", "params.yaml", ".dvcignore"]
METHOD = "pgd_at"     # the method whose finetune params the test changes


class Repo:
    """The temporary checkout and the environment its commands run in."""

    def __init__(self, root: Path, store: Path) -> None:
        self.root = root
        self.store = store
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
        # Bytecode caches are written as in CI (.dvcignore must keep them out of the stage hashes).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(PYTHONPATH=str(root), DVC_NO_ANALYTICS="1", ARPIPE_MLFLOW="1",
                   MLFLOW_TRACKING_URI=f"sqlite:///{store}",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
        self.env = env

    def run(self, *cmd: str) -> str:
        proc = subprocess.run(list(cmd), cwd=self.root, env=self.env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc.stdout + proc.stderr

    def dvc(self, *args: str) -> str:
        return self.run(sys.executable, "-m", "dvc", *args)

    def repro(self, *args: str) -> set[str]:
        """Run `dvc repro` (with `--dry`: only plan it); return the stages it ran (would run)."""
        return set(re.findall(r"Running stage '([^']+)'", self.dvc("repro", *args)))

    def changed(self) -> set[str]:
        """Stages `dvc status` reports as changed (before any re-run)."""
        out = self.dvc("status", "--json")
        return set(json.loads(out[out.index("{"):])) if "{" in out else set()

    def stages(self) -> set[str]:
        return set(self.dvc("stage", "list", "--all", "--name-only").split())

    def descendants(self, roots: set[str]) -> set[str]:
        """Every stage downstream of `roots` in `dvc dag`."""
        edges = re.findall(r'"([^"]+)" -> "([^"]+)"', self.dvc("dag", "--dot"))
        found, frontier = set(), set(roots)
        while frontier:
            frontier = {b for a, b in edges if a in frontier} - found
            found |= frontier
        return found

    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def write_params(self, raw: dict[str, Any]) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _provide_fashion_mnist(data: Path) -> None:
    """<data>/FashionMNIST/raw: the unpacked real files when this checkout has them, else Debian's
    copy (the loader unpacks it), else small synthetic files in the real format."""
    names = [n for pair in FASHION_FILES.values() for n in pair]
    unpacked = REPO / "data" / "FashionMNIST" / "raw"
    if all((unpacked / n).exists() for n in names):
        (data / "FashionMNIST").mkdir(parents=True)
        (data / "FashionMNIST" / "raw").symlink_to(unpacked.resolve(), target_is_directory=True)
    elif not all((DEBIAN_FASHION_MNIST / f"{n}.gz").exists() for n in names):
        write_fashion_mnist(data, n_train=2048, n_test=1000)
    else:
        data.mkdir(parents=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    base = tmp_path_factory.mktemp("pipeline")
    r = Repo(base / "repo", base / "mlflow.db")
    r.root.mkdir()
    r.run("git", "init", "-q")
    r.dvc("init", "-q")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, r.root / name, ignore=ignore)
        else:
            shutil.copy2(src, r.root / name)
    _provide_fashion_mnist(r.root / "data")
    r.run("arpipe", "profile", "ci")
    return r


@pytest.fixture(scope="module")
def first_run(repo: Repo) -> set[str]:
    return repo.repro()


def test_first_repro_runs_every_stage(repo: Repo, first_run: set[str]) -> None:
    stages = repo.stages()
    p = repo.params()
    expected = {"pretrain"} | {f"finetune@{m}" for m in p["finetune"]["methods"]} \
        | {f"evaluate@{m}" for m in p["evaluate"]["models"]}
    assert expected <= stages
    assert first_run == stages


def test_every_stage_logged_an_mlflow_run(repo: Repo, first_run: set[str]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo.store}")
    experiment = client.get_experiment_by_name(repo.params()["mlflow"]["experiment"])
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    logged = {r.data.tags.get("dvc_stage", r.info.run_name) for r in runs}
    assert repo.stages() - logged == {"validate"}, "stages without an MLflow run (validate computes nothing)"
    assert all(r.info.status == "FINISHED" for r in runs)


def _metrics_shown(repo: Repo, *targets: str) -> dict[str, Any]:
    out = repo.dvc("metrics", "show", "--json", *targets)
    return next(iter(json.loads(out[out.index("{"):]).values()))["data"]


def test_metrics_show_lists_headline_per_model_and_stage_files_by_path(repo: Repo, first_run: set[str]) -> None:
    headline = _metrics_shown(repo)
    assert all(path.startswith("metrics/headline/") for path in headline), "only the headline by default"
    by_path = _metrics_shown(repo, "metrics/eval")
    for model in repo.params()["evaluate"]["models"]:
        row = headline[f"metrics/headline/{model}.json"]["data"]
        assert 0 <= row["robust_lo"] <= row["robust"] <= row["robust_hi"] <= 100, model
        metrics = by_path[f"metrics/eval/{model}.json"]["data"]
        assert 0 <= metrics["pgd_acc"] <= metrics["clean_acc"] <= 1, model


@contextlib.contextmanager
def _mlflow_server(store: Path, repo: Repo) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over the sqlite `store`; its URL while the block runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=repo.root, env=repo.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600   # a loaded 2-core machine took 175 s to start it
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow server did not answer on 127.0.0.1")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _model_runs(client: Any, experiment: str, execution_filter: str = "") -> dict[str, Any]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`arpipe.role` = 'model'{execution_filter}",
                              max_results=1000)
    return {r.data.tags["arpipe.model"]: r for r in runs}


def test_each_method_run_carries_its_hyperparameters_robustness_and_common_artifacts(
        repo: Repo, first_run: set[str]) -> None:
    from mlflow.tracking import MlflowClient

    p = repo.params()
    with _mlflow_server(repo.store, repo) as url:
        client = MlflowClient(url)
        _check_model_runs(client, p, _model_runs(client, p["mlflow"]["experiment"]))


def _check_model_runs(client: Any, p: dict[str, Any], runs: dict[str, Any]) -> None:
    assert set(runs) == set(p["evaluate"]["models"]), "one run per model, not one per aggregate run"
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs.values()}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags["profile"] == "ci" and parent.data.tags["dataset"] == p["data"]["dataset"]
    artifacts = {}
    for model, run in runs.items():
        data = run.data
        assert data.params["objective"] == (model if model == "standard" else p["method"][model].get("objective", model))
        lr = p["finetune"]["optim"]["lr"] if model != "standard" else p["pretrain"]["optim"]["lr"]
        assert float(data.params["optim.lr"]) == lr and "attack.eps" in data.params, model
        assert 0 <= data.metrics["robust_lo"] <= data.metrics["robust"] <= data.metrics["robust_hi"], model
        assert data.metrics["eval/pgd_acc"] <= data.metrics["eval/clean_acc"], model
        assert client.get_metric_history(run.info.run_id, "train/val_clean_acc"), model
        artifacts[model] = {a.path for top in client.list_artifacts(run.info.run_id)
                            for a in (client.list_artifacts(run.info.run_id, top.path) if top.is_dir else [top])}
    names = next(iter(artifacts.values()))
    assert {"eval/plot.png", "corruption/heatmap.png", "train/history.csv"} <= names
    assert all(a == names for a in artifacts.values()), artifacts


def test_a_queued_experiments_runs_land_in_the_repositorys_store(repo: Repo, first_run: set[str]) -> None:
    """`dvc queue start` runs the experiment in a temporary copy (.dvc/tmp/exps/...), deleted afterwards;
    with no MLFLOW_TRACKING_URI its runs must land in <repo>/mlflow.db. A change of an aggregate param
    re-runs only validate and aggregate (the rest comes from the committed lock and the DVC cache)."""
    from mlflow.tracking import MlflowClient

    (repo.root / ".git" / "info" / "exclude").write_text("/data/\n/cache/\n/mlartifacts/\n/mlflow.db\n__pycache__/\n")
    repo.run("git", "add", "-A")
    repo.run("git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "ci run")
    env = {k: v for k, v in repo.env.items() if k != "MLFLOW_TRACKING_URI"}
    queued = Repo(repo.root, repo.root / "mlflow.db")
    queued.env = env
    queued.dvc("exp", "run", "--queue", "-n", "qexp", "-S", "aggregate.compare_to=[standard]")
    # The worker it starts inherits the command's output: not captured, or the call waits for the worker.
    subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "1"], cwd=repo.root, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    try:
        for _ in range(600):
            status = queued.dvc("queue", "status")
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            time.sleep(1)
        else:
            pytest.fail(f"the queued experiment did not finish:\n{status}")
    finally:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "stop"], cwd=repo.root, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    assert re.search(r"qexp.*Success", status), status + queued.dvc("queue", "logs", "qexp")
    assert queued.store.is_file(), "no store at the repository's root"
    p = repo.params()
    with _mlflow_server(queued.store, repo) as url:
        client = MlflowClient(url)
        runs = _model_runs(client, p["mlflow"]["experiment"], " and tags.dvc_exp_name = 'qexp'")
        _check_model_runs(client, p, runs)
        parent = client.get_run(next(iter(runs.values())).data.tags["mlflow.parentRunId"])
        assert parent.data.params["aggregate.compare_to"] == "['standard']"   # the experiment's knob
        artifacts = client.list_artifacts(runs["standard"].info.run_id, "eval")
        assert artifacts and (repo.root / "mlartifacts").is_dir(), "artifacts at the repository's root"


def test_second_repro_does_nothing(repo: Repo, first_run: set[str]) -> None:
    # Bytecode for every module, as any later import writes it, changes no stage's dependencies.
    repo.run(sys.executable, "-m", "compileall", "-q", "pipeline_lib", "stages")
    assert repo.changed() == set()
    assert repo.repro() == set()


def test_a_method_lr_change_reruns_only_that_method(repo: Repo, first_run: set[str]) -> None:
    raw = repo.params()
    optim = raw["method"][METHOD].setdefault("optim", {})
    optim["lr"] = 0.5 * optim.get("lr", raw["finetune"]["optim"]["lr"])
    repo.write_params(raw)

    finetune = f"finetune@{METHOD}"
    downstream = {finetune, "validate"} | repo.descendants({finetune})   # validate reads every param
    changed = repo.changed()   # stages that read the method's params directly (e.g. aggregate) may show too
    assert finetune in changed and changed <= downstream
    ran = repo.repro()
    assert {finetune, f"evaluate@{METHOD}"} <= ran
    assert ran <= downstream, "only the method and what follows it (after validating params)"
    others = {s for s in repo.stages() if s == "pretrain" or s.startswith(("finetune@", "evaluate@"))}
    assert ran & others == {finetune, f"evaluate@{METHOD}"}
    assert repo.changed() == set()


@pytest.mark.parametrize("edit", ["lerning_rate", "finetune.optim.lrr", "finetune.methods: []"])
def test_a_bad_param_stops_repro_before_any_output_is_removed(repo: Repo, first_run: set[str], edit: str) -> None:
    """`dvc repro` deletes a stage's outputs before its command runs: the validate stage, on which
    every stage depends, fails first and every previous output stays in place."""
    outputs = sorted(p for d in ("models", "metrics") for p in (repo.root / d).rglob("*")
                     if p.is_file() and p.name != ".params_validated")   # validate's own stamp goes, as DVC does
    before = {p: p.read_bytes() for p in outputs}
    original = (repo.root / "params.yaml").read_text()
    raw = repo.params()
    if edit == "lerning_rate":
        raw["lerning_rate"] = 0.1                       # an unknown top-level key no stage reads
    elif edit == "finetune.optim.lrr":
        raw["finetune"]["optim"]["lrr"] = 0.1
    else:
        raw["finetune"]["methods"] = []                 # DVC itself accepts the empty matrix
    repo.write_params(raw)
    try:
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo.root, env=repo.env,
                              capture_output=True, text=True, check=False)
    finally:
        (repo.root / "params.yaml").write_text(original)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.findall(r"Running stage '([^']+)'", out) == ["validate"]
    key = edit.split(":")[0].split(".")[-1] if edit != "finetune.methods: []" else "finetune.methods"
    assert any("params" in line and key in line for line in out.splitlines()), out[-2000:]
    assert {p: p.read_bytes() for p in outputs if p.exists()} == before, "an output was removed or changed"
    repo.dvc("repro", "validate")   # the stamp back (same bytes): nothing downstream changes
    assert repo.changed() == set()


def test_an_evaluation_change_reruns_no_training(repo: Repo, first_run: set[str]) -> None:
    """Planned with `dvc repro --dry` (status-based, no stage runs): the evaluate stages are the
    costly ones in `ci`, and no training stage lies downstream of them to be reached by outputs."""
    raw = repo.params()
    raw["evaluate"]["pgd"]["steps"] += 1
    repo.write_params(raw)

    evaluate = {s for s in repo.stages() if s.startswith("evaluate@")}
    downstream = evaluate | repo.descendants(evaluate)
    downstream |= {"validate"}   # depends on every param; its unchanged stamp stops it re-running others
    assert evaluate <= repo.changed() <= downstream
    planned = repo.repro("--dry")
    assert evaluate <= planned <= downstream
    training = {s for s in repo.stages() if s == "pretrain" or s.startswith("finetune@")}
    assert not planned & training and not training & downstream


@pytest.mark.parametrize("module_path", ["methods/cure.py", "method_params/cure.py"])
def test_editing_a_method_module_retrains_finetunes_but_not_pretraining(repo: Repo, first_run: set[str],
                                                                         module_path: str) -> None:
    """Code deps are as narrow as the code each stage runs: pretraining runs only the standard
    objective, so a change to another method's module (its training code or its params schema) leaves
    it (and its hours) alone."""
    module = repo.root / "pipeline_lib" / module_path
    original = module.read_text()
    try:
        module.write_text(original + "\n# edited\n")
        changed = repo.changed()
        finetunes = {s for s in repo.stages() if s.startswith("finetune@")}
        assert finetunes and finetunes <= changed
        assert "pretrain" not in changed
    finally:
        module.write_text(original)


def test_replicate_seeds_are_a_matrix_dimension_and_absent_by_default(tmp_path: Path) -> None:
    """Planned only (`dvc stage list`, `dvc repro --dry`): no stage runs. One seed keeps today's stage
    names; `replicates: [1, 2]` adds *_rep stages per seed whose names and paths carry the seed."""
    r = Repo(tmp_path / "repo", tmp_path / "mlflow.db")
    r.root.mkdir()
    r.run("git", "init", "-q")
    r.dvc("init", "-q")
    for name in PROJECT_FILES:
        src = REPO / name
        (shutil.copytree(src, r.root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
         if src.is_dir() else shutil.copy2(src, r.root / name))
    r.run("arpipe", "profile", "ci")
    default = r.stages()
    assert "pretrain" in default and not any("_rep" in s for s in default)

    r.run("arpipe", "profile", "ci", "replicates")
    p = r.params()
    assert p["replicates"] == [1, 2]
    stages = r.stages()
    assert default <= stages
    expected = {f"pretrain_rep@{s}" for s in (1, 2)} \
        | {f"finetune_rep@{s}-{m}" for s in (1, 2) for m in p["finetune"]["methods"]} \
        | {f"{kind}_rep@{s}-{m}" for kind in ("evaluate", "corruption") for s in (1, 2) for m in p["evaluate"]["models"]}
    assert stages - default == expected
    # The stages' commands as DVC resolves them (`repro --dry` stops at the first missing model file).
    planned = r.run(sys.executable, "-c", "from dvc.repo import Repo\n"
                    "for s in Repo('.').index.stages: print(s.addressing, s.cmd)")
    assert "arpipe pretrain --seed 2 --out models/seed2/standard.pt" in planned
    assert "arpipe finetune pgd_at --seed 1 --pretrained models/seed1/standard.pt" in planned
    assert "--metrics metrics/eval/seed1/pgd_at.json" in planned
