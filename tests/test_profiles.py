"""Profiles: Hydra composition (DVC's mechanism) and `arpipe profile` agree, the committed params.yaml
is the default composition, and each paper profile resolves to the papers' settings (REFERENCE §1)."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from datafiles import REPO, arpipe_torch_probe
from pipeline_lib.aggregation.job import objectives
from pipeline_lib.config import Params, parse_params
from pipeline_lib.data import get_spec
from pipeline_lib.models import build_model
from pipeline_lib.profiles import (COMPOSED_MARK, DEFAULT_HEADER, ProfileError, available, compose, compose_hydra,
                                   default_params_text, drift, dump, generated_from)
from pipeline_lib.training import TrainJob, finetune_job
from stages.cli import app

CONF = REPO / "conf"
PROFILES = CONF / "profile"
PAPER = ["cifar10_resnet18", "cifar10_wrn34_10", "cifar100_resnet18", "cifar100_wrn34_10"]
COMBINATIONS = [[name] for name in available(PROFILES)] + [
    ["cifar10_resnet18", "sweep_arrest_phi"], ["cifar100_wrn34_10", "sweep_trades_beta", "gpu_fast"],
    ["cifar10_wrn34_10", "ci"]]
runner = CliRunner()


def _params_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def _job(p: Params, name: str) -> TrainJob:
    """Finetune instance `name` as the finetune stage builds it."""
    return finetune_job(name, p.method[name], p.finetune.optim, p.threat)


def _dump(job: TrainJob) -> dict[str, Any]:
    return {"objective": job.objective, "init": job.init, "optim": job.optim.model_dump(),
            "attack": job.attack.model_dump(), "params": job.objective_params.model_dump()}


def _composed(*names: str) -> Params:
    return parse_params(compose_hydra(list(names), conf_dir=CONF), "+".join(names))


# --------------------------------------------------------------------------- params.yaml <-> conf/
def test_committed_params_are_the_default_composition() -> None:
    """What `dvc exp run` (Hydra on) writes without a profile is exactly the committed params.yaml."""
    diff = drift(_params_yaml(), compose_hydra([], conf_dir=CONF))
    assert not diff, "params.yaml is not what conf/ generates; run `arpipe profile`:\n" + "\n".join(diff)


def test_committed_params_yaml_is_generated_from_conf_verbatim() -> None:
    """conf/base.yaml is the source: the committed params.yaml is `arpipe profile`'s output for it,
    comments included, and says so in its first line."""
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    assert text == default_params_text(CONF / "base.yaml"), \
        "params.yaml was edited by hand; move the edit to conf/base.yaml and run `arpipe profile`"
    assert text.startswith(DEFAULT_HEADER) and generated_from(text) == []


def test_dvc_has_hydra_composition_enabled() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".dvc" / "config")
    assert cfg.get("hydra", "enabled", fallback="false").strip().lower() == "true"
    assert (CONF / "config.yaml").exists()   # DVC's default config_dir / config_name


@pytest.mark.parametrize("names", COMBINATIONS, ids="+".join)
def test_hydra_and_plain_composition_agree_and_validate(names: list[str]) -> None:
    hydra = compose_hydra(names, conf_dir=CONF)
    assert hydra == compose(_params_yaml(), names, PROFILES)
    parse_params(hydra, "+".join(names))


def test_arpipe_profile_writes_what_dvc_exp_run_writes(tmp_path: Path) -> None:
    """`arpipe profile X` and DVC's own Hydra step (`dvc exp run -S profile=X`) give the same file
    (arpipe adds a comment header saying how it was made)."""
    from dvc.utils.hydra import compose_and_dump

    ours, dvcs = tmp_path / "ours.yaml", tmp_path / "dvc.yaml"
    result = runner.invoke(app, ["profile", "cifar10_wrn34_10", "gpu_fast", "--out", str(ours), "--conf-dir", str(CONF)])
    assert result.exit_code == 0, result.output
    compose_and_dump(dvcs, str(CONF), None, "config", str(tmp_path), ["profile=[cifar10_wrn34_10,gpu_fast]"])
    text = ours.read_text()
    assert text.startswith(COMPOSED_MARK)
    assert text.split("\n", 2)[2] == dvcs.read_text() == dump(compose_hydra(["cifar10_wrn34_10", "gpu_fast"],
                                                                            conf_dir=CONF))


def test_set_param_overrides_compose_on_top_of_profiles() -> None:
    """`dvc exp run -S profile=ci -S seed=3 -S runtime.nproc_per_node=2` in Hydra's grammar."""
    p = parse_params(compose_hydra(["ci"], ["seed=3", "runtime.nproc_per_node=2"], conf_dir=CONF))
    ci = yaml.safe_load((PROFILES / "ci.yaml").read_text(encoding="utf-8"))
    assert p.seed == 3 and p.runtime.nproc_per_node == 2 and p.data.n_train == ci["data"]["n_train"]


# --------------------------------------------------------------------------- the paper profiles
EPS, STEP = 8 / 255, 2 / 255
ARCH: dict[str, dict[str, Any]] = {   # REFERENCE §1: AR-AT layers / gamma, CURE p / alpha / gamma
    "resnet18": {"arat_gamma": 30.0, "arat_layers": 4, "cure": (30.0, 0.1, 1.0)},
    "wrn34_10": {"arat_gamma": 100.0, "arat_layers": 11, "cure": (50.0, 0.3, 0.5)},
}


@pytest.mark.parametrize("profile", PAPER)
def test_paper_profile_resolves_to_the_papers_settings(profile: str) -> None:
    dataset, arch = profile.split("_", 1)
    p = _composed(profile)
    assert (p.data.dataset, p.model.arch, p.data.n_train, p.data.augmentation) == (dataset, arch, None, "crop_flip")
    assert p.threat.eps == pytest.approx(EPS) and p.threat.train_step_size == pytest.approx(STEP)
    assert set(p.finetune.methods) == {"pgd_at", "trades", "mart", "arrest", "arat", "cure"}
    inits = {"pgd_at": "scratch", "trades": "scratch", "mart": "scratch", "arat": "scratch",
             "arrest": "pretrained", "cure": "pretrained"}
    for name in p.finetune.methods:
        r = _job(p, name)
        assert r.init == inits[name], name
        assert (r.attack.steps, r.attack.eps) == (10, pytest.approx(EPS)) and r.attack.step_size == pytest.approx(STEP)
        assert (r.optim.lr, r.optim.batch_size, r.optim.momentum, r.optim.weight_decay) == (0.1, 128, 0.9, 5e-4)
        expected = (200, [100, 150]) if name == "cure" else (100, [75, 90])
        assert (r.optim.epochs, r.optim.milestones) == expected, name
    assert _job(p, "trades").objective_params.beta == 6.0 and _job(p, "mart").objective_params.beta == 6.0
    assert _job(p, "arrest").objective_params.phi_deg == 37.5
    arat, cure = _job(p, "arat").objective_params, _job(p, "cure").objective_params
    assert arat.gamma == ARCH[arch]["arat_gamma"] and len(arat.layers) == ARCH[arch]["arat_layers"]
    with torch.device("meta"):    # the layer names exist in the architecture (no weights allocated)
        names = dict(build_model(arch, get_spec(dataset)).named_modules())
    assert set(arat.layers) <= set(names)
    assert (cure.p, cure.alpha, cure.gamma) == ARCH[arch]["cure"] and cure.beta == 1.0
    e = p.evaluate
    assert (e.n_eval, e.autoattack.version, e.pgd.steps) == (10000, "standard", 20)
    assert e.pgd.step_size == pytest.approx(STEP) and set(e.models) == {"standard", *p.finetune.methods}
    assert p.corruption.source == "released" and p.mlflow.experiment == profile


def test_profile_parts_are_not_selectable() -> None:
    assert {"_paper", "_resnet18", "_wrn34_10"}.isdisjoint(available(PROFILES))
    assert set(PAPER) <= set(available(PROFILES))


@pytest.mark.parametrize(("sweep", "objective", "knob", "values"), [
    ("sweep_arrest_phi", "arrest", "phi_deg", {30.0, 37.5, 45.0}),
    ("sweep_trades_beta", "trades", "beta", {1.0, 3.0, 6.0}),
])
def test_sweep_profiles_add_points_the_aggregate_groups(sweep: str, objective: str, knob: str,
                                                        values: set[float]) -> None:
    p = _composed("cifar10_resnet18", sweep)
    points = [name for name, obj in objectives(p).items() if obj == objective]
    assert {getattr(_job(p, n).objective_params, knob) for n in points} == values
    assert set(points) <= set(p.finetune.methods) and set(points) <= set(p.evaluate.models)
    assert objective not in p.aggregate.reference_models          # the swept method is not its own reference
    # the points differ in the knob only
    dumps = [_dump(_job(p, n)) for n in points]
    for d in dumps:
        d["params"].pop(knob)
    assert all(d == dumps[0] for d in dumps)


@pytest.mark.parametrize("profile", PAPER)
def test_paper_profiles_follow_the_official_code_where_the_paper_is_silent(profile: str) -> None:
    p = _composed(profile)
    trades, mart, cure = (_job(p, n).objective_params for n in ("trades", "mart", "cure"))
    assert (trades.clamp_start, trades.three_forwards, mart.clamp_start, cure.clamp_start) == (False, True, False, False)
    assert cure.rgp_variant == "paper"                 # the paper defines RGP: not silent
    arat = _job(p, "arat")
    assert arat.optim.first_epoch_lr == 0.02 and (arat.objective_params.swa_every, arat.objective_params.swa_bn_batches) == (500, None)
    assert all(_job(p, n).optim.first_epoch_lr is None for n in p.finetune.methods if n != "arat")
    # the default profile keeps the project behaviour (params.yaml says why)
    d = parse_params(_params_yaml(), "params.yaml")
    assert _job(d, "trades").objective_params.clamp_start and not _job(d, "trades").objective_params.three_forwards


def test_arrest_ablation_crosses_lambda_and_distance_and_nothing_else() -> None:
    p = _composed("cifar10_resnet18", "sweep_arrest_ablation")
    points = [name for name, obj in objectives(p).items() if obj == "arrest"]
    grid = {(_job(p, n).objective_params.lam, _job(p, n).objective_params.distance) for n in points}
    assert grid == {(lam, d) for lam in (2.0, 5.0, 20.0) for d in ("cosine", "angle", "l2")} and len(points) == 9
    assert set(points) <= set(p.finetune.methods) and set(points) <= set(p.evaluate.models)
    assert _job(p, "arrest").objective_params.lam == _job(_composed("cifar10_resnet18"), "arrest").objective_params.lam
    dumps = [_dump(_job(p, n)) for n in points]
    for d in dumps:
        d["params"].pop("lam")
        d["params"].pop("distance")
    assert all(d == dumps[0] for d in dumps)


def test_composition_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown profile 'cifar10_resnet50'.*cifar10_resnet18"):
        compose_hydra(["cifar10_resnet50"], conf_dir=CONF)
    (tmp_path / "a.yaml").write_text("defaults: [b, _self_]\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("defaults: [a, _self_]\n")
    (tmp_path / "c.yaml").write_text("defaults: [b]\n")
    with pytest.raises(ProfileError, match="cycle: a -> b -> a"):
        compose({}, ["a"], tmp_path)
    with pytest.raises(ProfileError, match="_self_"):
        compose({}, ["c"], tmp_path)


# --------------------------------------------------------------------------- `arpipe profile` round trip
@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of conf/ and params.yaml to edit."""
    shutil.copytree(CONF, tmp_path / "conf")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def _run(project: Path, *args: str) -> Any:
    return runner.invoke(app, ["profile", *args, "--out", str(project / "params.yaml"),
                               "--conf-dir", str(project / "conf")])


def test_select_restore_edit_source_check(project: Path) -> None:
    params = project / "params.yaml"
    base = project / "conf" / "base.yaml"
    default = params.read_text()
    assert _run(project, "--check").exit_code == 0

    assert _run(project, "cifar100_resnet18").exit_code == 0          # select a profile
    assert yaml.safe_load(params.read_text())["data"]["dataset"] == "cifar100"
    assert generated_from(params.read_text()) == ["cifar100_resnet18"]
    assert _run(project, "--check").exit_code == 0                    # a composed file checks against its profiles

    assert _run(project).exit_code == 0                               # restore the default, comments and all
    assert params.read_text() == default

    params.write_text(default.replace("seed: 0", "seed: 7", 1))      # a hand edit of the generated file ...
    result = _run(project, "--check")
    assert result.exit_code == 1 and "seed: params.yaml 7, conf 0" in result.output
    params.write_text(default.split("\n", 2)[2])                     # ... or a file that lost its header
    result = _run(project, "--check")
    assert result.exit_code == 1 and "not the generated header" in " ".join(result.output.split())

    base.write_text(base.read_text().replace("seed: 0", "seed: 7", 1))   # an edit of the source ...
    assert _run(project).exit_code == 0                                  # ... regenerates params.yaml
    assert yaml.safe_load(params.read_text())["seed"] == 7 and params.read_text().startswith(DEFAULT_HEADER)
    assert _run(project, "--check").exit_code == 0
    assert compose_hydra(["ci"], conf_dir=project / "conf")["seed"] == 7   # profiles compose on the new default


def test_profile_list_shows_profiles_not_parts(project: Path) -> None:
    result = _run(project, "--list")
    assert result.exit_code == 0 and "cifar10_wrn34_10" in result.output and "_paper" not in result.output


@pytest.mark.parametrize(("overlay", "named"), [
    ("data: {n_train: 0}", "data.n_train"),                                       # the schema
    ("method: {arrest: {params: {phi_deg: 500}}}", "method.arrest.params: phi_deg"),  # the objective's params
    ("model: {arch: vgg16}", "model.arch: unknown model 'vgg16'")])                 # the architectures
def test_a_profile_that_breaks_validation_is_not_written(project: Path, overlay: str, named: str) -> None:
    (project / "conf" / "profile" / "bad.yaml").write_text(f"# @package _global_\n{overlay}\n")
    before = (project / "params.yaml").read_text()
    result = _run(project, "bad")
    assert result.exit_code == 2 and named in " ".join(result.output.split())
    assert (project / "params.yaml").read_text() == before


def test_arpipe_profile_imports_no_torch(project: Path) -> None:
    """`arpipe profile` validates what it writes against the registries too (the architecture, every method's
    params), which import no torch: it runs in about a second. A fresh interpreter runs it for composed profiles
    and for the default and reports the torch modules it loaded; each run must pass and write its file."""
    for names in (["cifar10_resnet18", "sweep_arrest_phi"], []):
        out = arpipe_torch_probe("profile", *names, "--out", str(project / "params.yaml"),
                                 "--conf-dir", str(project / "conf"))
        assert out.splitlines()[-1] == "EXIT 0 []", out[-2000:]
        assert generated_from((project / "params.yaml").read_text()) == names


# --------------------------------------------------------------------------- DVC itself
@pytest.mark.slow
def test_dvc_exp_run_composes_the_profile(tmp_path: Path) -> None:
    """`dvc exp run -S profile=...` in a throwaway repo: DVC composes conf/ into params.yaml and the
    stage sees the profile's values (a one-line stage stands in for the pipeline)."""
    shutil.copytree(CONF, tmp_path / "conf")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  show:\n    cmd: python -c \"import yaml; p = yaml.safe_load(open('params.yaml')); "
        "open('out.txt', 'w').write(p['data']['dataset'] + ' ' + p['model']['arch'])\"\n"
        "    params: [data.dataset, model.arch]\n    outs: [out.txt]\n")

    env = {**os.environ, "DVC_NO_ANALYTICS": "1",   # the venv's python for the stage command
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def sh(*cmd: str) -> str:
        argv = [sys.executable, "-m", "dvc", *cmd[1:]] if cmd[0] == "dvc" else list(cmd)
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr[-2000:]}"
        return done.stdout

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@example.com")
    sh("git", "config", "user.name", "t")
    sh("dvc", "init", "-q")
    sh("dvc", "config", "hydra.enabled", "true")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    sh("dvc", "exp", "run", "-S", "profile=cifar100_wrn34_10")
    assert (tmp_path / "out.txt").read_text() == "cifar100 wrn34_10"
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == compose_hydra(["cifar100_wrn34_10"],
                                                                                    conf_dir=CONF)
