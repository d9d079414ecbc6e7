"""Multi-process training: two gloo processes on CPU train what one process trains.

The heart is one spawn of two processes (gloo backend, CPU) that trains pgd_at, AR-AT
(split BN, predictors with BatchNorm1d, auto-balance, train-mode attack through the adv BN)
and CURE (RGP mask from the global gradient, revision EMA, revision forward with global BN
statistics) for one epoch of three global batches of 16, next to the same runs in this process.

Random attack starts are drawn per rank (independent noise per shard), so they cannot match
one process number for number: the runs here start deterministically. PGD starts at x.
CURE's TRADES attack starting at x has an exactly-zero KL gradient, so its sign steps follow
rounding noise (which differs with the batch split): its case makes the attack immaterial
(eps 1e-6, beta 0) and checks what multi-process training must keep exact for CURE - the RGP
mask and the revision model. What is left are float summation orders: TOL bounds them, except
that RGP's hard p-percentile cut may flip the odd weight sitting at the boundary (BOUNDARY_FRACTION).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from datafiles import REPO, banded_images, tiny_params, write_fashion_mnist
from pipeline_lib import checkpoint, distributed
from pipeline_lib.config import AttackParams, OptimParams, RuntimeParams
from pipeline_lib.data import BatchLoader, get_spec
from pipeline_lib.io import read_json
from pipeline_lib.methods import ObjectiveContext, build_objective
from pipeline_lib.models import build_model
from pipeline_lib.training import TrainOutputs, fit, pretrain_job, run_training
from pipeline_lib.training.jobs import prepare_for_training

# Largest |difference| allowed between one-process and two-process weights, BN statistics,
# predictor weights and epoch statistics after three SGD steps (lr 0.05). Measured here:
# pgd_at 1.3e-7, AR-AT 6.8e-5 (its train-mode attack: a few sign steps flip with the float
# order), epoch statistics <= 2.5e-6; per-shard BatchNorm statistics give 0.12 and move 99%
# of the entries by more than TOL (test_unsynchronised_batchnorm_is_caught).
TOL = 5e-4

# Fraction of weight entries allowed beyond TOL: CURE's RGP mask boundary (measured: 13 of 19617
# entries beyond 1e-4; with per-rank RGP scores instead of global ones 18913 of 19617, and the
# two ranks then hold different models).
BOUNDARY_FRACTION = 5e-3

CASES: dict[str, dict[str, Any]] = {
    "pgd_at": {"objective": "pgd_at", "params": {}},
    "arat": {"objective": "arat", "params": {"balance_images": 32}},
    "cure": {"objective": "cure", "eps": 1e-6,
             "params": {"init_std": 0.0, "beta": 0.0, "rgp_adv_loss": "ce", "r": 0.5, "p": 30.0}},
    "pgd_at_unsynced_bn": {"objective": "pgd_at", "params": {}, "sync_bn": False},
}


def train_case(name: str, rank: int, world: int) -> dict[str, Any]:
    """One epoch of CASES[name] on this rank's shards; the exported weights, extras and epoch record."""
    case = CASES[name]
    spec = get_spec("fashion_mnist")
    images, labels = (torch.from_numpy(a) for a in banded_images(48, 1, 28, 10, seed=3))
    loader = BatchLoader(images, labels, 16, shuffle=True, augment="flip", drop_last=True, seed=0, rank=rank,
                         world_size=world)
    val = BatchLoader(images[:16], labels[:16], 16)
    eps = case.get("eps", 0.1)
    attack = AttackParams(eps=eps, step_size=eps / 2, steps=2, random_start=False)
    ctx = ObjectiveContext(attack=attack, num_classes=10, device=torch.device("cpu"), input_shape=(1, 28, 28),
                           seed=0)
    objective = build_objective(case["objective"], case["params"], ctx)
    torch.manual_seed(0)
    model = prepare_for_training(build_model("small_cnn", spec), objective, torch.device("cpu"),
                                 sync_bn=world > 1 and case.get("sync_bn", True))
    result = fit(model, objective, loader, val, OptimParams(epochs=1, batch_size=16, lr=0.05), seed=0,
                 progress=False)
    exported = objective.export_model(result.model)
    record = {k: v for k, v in result.history[-1].items() if k != "epoch_time_s"}
    return {"state": {k: v.detach().clone() for k, v in exported.state_dict().items()},
            "extra": {k: v.detach().clone() for k, v in objective.extra_modules().state_dict().items()},
            "record": record}


def _worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)   # two processes on a shared 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        torch.save({name: train_case(name, rank, world) for name in CASES}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    return {name: train_case(name, 0, 1) for name in CASES}


def _differences(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, float]:
    """(fraction of tensor entries differing by more than TOL, largest tensor |a - b|, largest
    |a - b| of the epoch record's statistics) over weights, buffers and extra modules."""
    assert a["state"].keys() == b["state"].keys() and a["extra"].keys() == b["extra"].keys()
    assert a["record"].keys() == b["record"].keys()
    diffs = torch.cat([(a[s][k].double() - b[s][k].double()).abs().flatten() for s in ("state", "extra")
                       for k in a[s]])
    record = max(abs(a["record"][k] - b["record"][k]) for k in a["record"])
    return float((diffs > TOL).double().mean()), float(diffs.max()), record


@pytest.mark.parametrize("name", ["pgd_at", "arat", "cure"])
def test_two_processes_train_what_one_process_trains(name: str, two_processes: list[dict[str, Any]],
                                                     one_process: dict[str, Any]) -> None:
    beyond, largest, record = _differences(two_processes[0][name], one_process[name])
    allowed = BOUNDARY_FRACTION if name == "cure" else 0.0
    assert beyond <= allowed, (f"{name}: {beyond:.2%} of the weights differ from one process by more than {TOL} "
                               f"(largest {largest:.2e})")
    assert record < TOL, f"{name}: epoch statistics differ from one process by {record:.2e}"
    # the run did train: the weights moved away from their initialisation
    torch.manual_seed(0)
    init = build_model("small_cnn", get_spec("fashion_mnist")).state_dict()
    moved = max(float((one_process[name]["state"][k] - v).abs().max()) for k, v in init.items() if v.is_floating_point())
    assert moved > 20 * TOL, f"{name}: training barely moved the weights ({moved:.2e}): nothing was compared"


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_holds_the_same_model(name: str, two_processes: list[dict[str, Any]]) -> None:
    a, b = two_processes
    for section in ("state", "extra"):
        for key, value in a[name][section].items():
            assert torch.equal(value, b[name][section][key]), f"{name}: rank 0 and 1 differ at {section}.{key}"
    assert a[name]["record"] == b[name]["record"]


def test_unsynchronised_batchnorm_is_caught(two_processes: list[dict[str, Any]], one_process: dict[str, Any]) -> None:
    """Per-shard BatchNorm statistics (runtime.sync_bn: false) move the result well beyond TOL:
    the tolerance above is tight enough to see a real difference."""
    beyond, largest, _ = _differences(two_processes[0]["pgd_at_unsynced_bn"], one_process["pgd_at_unsynced_bn"])
    assert beyond > 0.1 and largest > 10 * TOL


# --------------------------------------------------------------------------- launching and sharding
def test_launch_command_one_node_is_standalone() -> None:
    cmd = distributed.launch_command(["finetune", "arat", "--out", "m.pt"], nproc_per_node=4, nnodes=1,
                                     rdzv_endpoint="localhost:29400", run_id="finetune@arat")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd and not any("rdzv" in c for c in cmd)
    assert cmd[-6:] == ["-m", "stages.cli", "finetune", "arat", "--out", "m.pt"]


def test_launch_command_several_nodes_meet_at_the_rendezvous() -> None:
    cmd = distributed.launch_command(["pretrain"], nproc_per_node=8, nnodes=2, rdzv_endpoint="node0:29400",
                                     run_id="finetune@arrest_phi30")
    assert "--standalone" not in cmd
    assert {"--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400",
            "--rdzv-id=finetune-arrest_phi30"} <= set(cmd)


def test_relaunch_only_outside_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.launch_needed(2, 1) and distributed.launch_needed(1, 2)
    assert not distributed.launch_needed(1, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not distributed.launch_needed(2, 1)   # a process torchrun started trains, it does not relaunch
    assert distributed.rank() == 1 and not distributed.is_main_process()


def test_runtime_params_refuse_one_gpu_for_several_processes() -> None:
    with pytest.raises(ValueError, match="cuda:1"):
        RuntimeParams(device="cuda:1", nproc_per_node=2)
    with pytest.raises(ValueError, match="host:port"):
        RuntimeParams(rdzv_endpoint="node0")
    assert RuntimeParams(nproc_per_node=4, nnodes=2).world_size == 8


@pytest.mark.parametrize("storage", ["device", "pinned"])
def test_rank_shards_make_up_the_single_process_batch(storage: str) -> None:
    images, labels = (torch.from_numpy(a) for a in banded_images(40, 3, 8, 10, seed=1))

    def epoch(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = BatchLoader(images, labels, 8, shuffle=True, augment="crop_flip", drop_last=True, seed=4,
                             storage=storage, rank=rank, world_size=world)  # type: ignore[arg-type]
        loader.set_epoch(2)
        return list(loader)

    whole, shards = epoch(0, 1), [epoch(r, 4) for r in range(4)]
    assert len(whole) == 5 and all(len(s) == 5 for s in shards)
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([s[i][0] for s in shards]), x)   # same examples, same crops and flips
        assert torch.equal(torch.cat([s[i][1] for s in shards]), y)
    with pytest.raises(ValueError, match="batch_size=8 is not divisible by the 3 processes"):
        BatchLoader(images, labels, 8, rank=0, world_size=3)


def test_collectives_are_no_ops_in_one_process() -> None:
    assert not distributed.is_distributed() and distributed.world_size() == 1
    t = torch.arange(4.0)
    distributed.all_reduce_mean_([t])
    assert torch.equal(t, torch.arange(4.0))
    assert distributed.all_reduce_sum({"b": torch.tensor(2.0), "a": 1.0}, torch.device("cpu")) == {"b": 2.0, "a": 1.0}
    bn = torch.nn.BatchNorm2d(3)
    synced = distributed.sync_batchnorm(torch.nn.Sequential(bn), torch.device("cpu"))
    assert isinstance(synced[0], distributed.AllReduceBatchNorm) and synced[0].weight is bn.weight
    x = torch.randn(4, 3, 5, 5)
    assert torch.allclose(synced(x), bn(x))   # outside a process group: plain BatchNorm




# --------------------------------------------------------------------------- the stage command under torchrun
@pytest.mark.slow
def test_stage_command_relaunches_itself_under_torchrun(tmp_path: Path) -> None:
    """`arpipe pretrain` with runtime.nproc_per_node: 2 re-executes under torchrun (2 gloo processes);
    rank 0 alone writes the outputs, which match a one-process run."""
    write_fashion_mnist(tmp_path / "data", n_train=128, n_test=64)
    sections: dict[str, Any] = {"pretrain": {"optim": {"epochs": 1, "batch_size": 32, "milestones": []}}}
    two = tiny_params(tmp_path / "data", runtime={"nproc_per_node": 2, "device": "cpu", "progress": False},
                      **sections)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(two.model_dump(mode="json"), sort_keys=False))
    out = TrainOutputs(tmp_path / "ddp.pt", tmp_path / "ddp.json", tmp_path / "ddp.csv", tmp_path / "unused")
    env = {**os.environ, "ARPIPE_MLFLOW": "0", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "stages.cli", "pretrain", "--out", str(out.checkpoint),
                          "--metrics", str(out.metrics), "--history", str(out.history), "--params", str(params)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "launching 2 processes" in run.stderr and "--standalone" in run.stderr
    assert run.stderr.count("pretrain: val clean acc") == 1           # rank 0 alone reports
    metrics = read_json(out.metrics)
    assert metrics["world_size"] == 2
    assert not (tmp_path / "cache" / "train_state" / "pretrain.pt").exists()   # finished: no resume state

    one = tiny_params(tmp_path / "data", runtime={"device": "cpu", "progress": False}, **sections)
    ref = TrainOutputs(tmp_path / "one.pt", tmp_path / "one.json", tmp_path / "one.csv", tmp_path / "state.pt")
    run_training(one, pretrain_job(one), ref)
    a, b = checkpoint.load_model(out.checkpoint)[0].state_dict(), checkpoint.load_model(ref.checkpoint)[0].state_dict()
    assert a.keys() == b.keys()
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) < TOL
