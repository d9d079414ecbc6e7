"""Params validation: every kind of bad value is named, and the stage commands stop before any work."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import pipeline_lib.training
from datafiles import REPO, base_params_dict, python_stdout
from pipeline_lib.config import ParamsError, load_params, parse_params
from pipeline_lib.profiles import available, compose
from pipeline_lib.registered import check_registered
from pipeline_lib.training import finetune_job
from stages.cli import app

PROFILE_DIR = REPO / "conf" / "profile"
Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """A mutation setting the dotted key `path` (creating mappings on the way)."""

    def mutate(raw: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return mutate


def _errors_of(mutate: Mutation) -> str:
    raw = copy.deepcopy(base_params_dict())
    mutate(raw)
    with pytest.raises(ParamsError) as info:
        check_registered(parse_params(raw, "params.yaml"), "params.yaml")
    return str(info.value)


def test_committed_params_validate() -> None:
    p = load_params(REPO / "params.yaml")
    assert p.finetune.methods and set(p.evaluate.models) <= {"standard", *p.finetune.methods}


@pytest.mark.parametrize("profile", available(PROFILE_DIR))
def test_every_profile_composes_to_valid_params(profile: str) -> None:
    p = parse_params(base_params_dict(profile), f"params.yaml + {profile}")
    check_registered(p, f"params.yaml + {profile}")
    overlay = yaml.safe_load((PROFILE_DIR / f"{profile}.yaml").read_text()) or {}
    # The overlay's scalar settings win over params.yaml (spot-check the top-level sections it sets).
    for section, values in overlay.items():
        if isinstance(values, dict):
            dumped = p.model_dump()[section]
            for key, value in values.items():
                if not isinstance(value, dict):
                    assert dumped[key] == value, f"{profile}: {section}.{key}"


# (mutation, substrings the message must contain: the key and the bad value)
BAD: dict[str, tuple[Mutation, list[str]]] = {
    "unknown top-level key": (_set("trainer", {"epochs": 3}), ["trainer", "unknown key"]),
    "unknown nested key": (_set("pretrain.optim.learning_rate", 0.1), ["pretrain.optim.learning_rate", "unknown key"]),
    "unknown method key": (_set("method.pgd_at.beta", 6.0), ["method.pgd_at.beta", "unknown key"]),
    "unknown dataset": (_set("data.dataset", "mnist"), ["data.dataset", "'mnist'", "fashion_mnist"]),
    "unknown arch": (_set("model.arch", "vgg16"), ["model.arch", "'vgg16'", "small_cnn"]),
    "unknown objective": (_set("method.pgd_at.objective", "madry"), ["method.pgd_at", "'madry'"]),
    "undefined method": (lambda r: r["finetune"]["methods"].append("trades_b9"),
                         ["finetune.methods", "'trades_b9'", "method.trades_b9"]),
    "duplicate method": (lambda r: r["finetune"]["methods"].append(r["finetune"]["methods"][0]),
                         ["finetune.methods", "duplicates"]),
    "untrained evaluate model": (lambda r: r["evaluate"]["models"].append("ghost"), ["evaluate.models", "'ghost'"]),
    "negative lr": (_set("pretrain.optim.lr", -0.1), ["pretrain.optim.lr", "-0.1"]),
    "negative method lr": (_set("method.pgd_at.optim.lr", -1.0), ["method.pgd_at.optim.lr", "-1.0"]),
    "milestone past the end": (_set("pretrain.optim.milestones", [99]), ["pretrain.optim", "[99]", "epochs="]),
    "decreasing milestones": (_set("pretrain.optim.milestones", [3, 2]), ["pretrain.optim", "[3, 2]"]),
    "method milestone past the end": (_set("method.pgd_at.optim.milestones", [50]), ["method.pgd_at", "[50]"]),
    "n_train too big": (_set("data.n_train", 60_001), ["data", "n_train=60001", "60000"]),
    "n_val too big": (_set("data.n_val", 10_001), ["data", "n_val=10001"]),
    "n_eval too big": (_set("evaluate.n_eval", 10_001), ["evaluate.n_eval=10001"]),
    "batch larger than the subset": (_set("data.n_train", 100), ["batch_size=", "100"]),
    "eps out of range": (_set("threat.eps", 8), ["threat.eps", "8"]),
    "zero attack steps": (_set("threat.train_steps", 0), ["threat.train_steps", "0"]),
    "bad augmentation": (_set("data.augment", "mixup"), ["data.augment", "'mixup'"]),
    "bad device": (_set("runtime.device", "gpu"), ["runtime.device", "'gpu'"]),
    "wrong type": (_set("evaluate.n_eval", "many"), ["evaluate.n_eval", "'many'"]),
    "missing section": (lambda r: r.pop("threat"), ["threat", "Field required"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_params_are_named(case: str) -> None:
    mutate, expected = BAD[case]
    message = _errors_of(mutate)
    missing = [s for s in expected if s not in message]
    assert not missing, f"{case}: {missing} not in {message!r}"
    assert message.startswith("params.yaml: ")


# Every stage loads and checks its params first: none of these may be imported for it.
HEAVY = "('torch', 'scipy', 'mlflow', 'pandas', 'matplotlib')"
LOADED_HEAVY = f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY}))"


def test_the_params_schema_imports_no_torch() -> None:
    """config.py composes torch-free section modules: loading params costs no torch import (and cannot
    hide an import circle with a subsystem), nor SciPy's, MLflow's, pandas' or matplotlib's (every stage
    loads params first: SciPy alone, through the aggregation package, cost each stage ~1.3 s).
    Planted check: the subprocess reports what it imported."""
    out = python_stdout(f"import sys, pipeline_lib.config; {LOADED_HEAVY}").strip()
    assert out == "[]", out


def test_the_registry_checks_and_finetune_jobs_import_no_torch() -> None:
    """What only the registries know (the architecture, each objective's params) is checked with torch-free
    registries (pipeline_lib.models, pipeline_lib.method_params), and each finetune instance's job is resolved
    without torch: the stages that train nothing (aggregate, profile) pay no torch import for them."""
    code = ("import sys\nfrom pipeline_lib.config import load_params\n"
            "from pipeline_lib.registered import check_registered\nfrom pipeline_lib.training import finetune_job\n"
            "p = load_params('params.yaml')\nassert check_registered(p).keys() == p.method.keys()\n"
            "for n, s in p.method.items():\n    finetune_job(n, s, p.finetune.optim, p.threat)\n"
            f"{LOADED_HEAVY}\n")
    out = python_stdout(code).strip()
    assert out == "[]", out


def test_registry_checks_name_the_key(tmp_path: Path) -> None:
    """What only the registries know fails through check_registered with the key, the value and the names."""
    raw = copy.deepcopy(base_params_dict())
    raw["method"]["arrest"]["params"]["phi_deg"] = 500
    p = parse_params(raw, "params.yaml")   # the schema alone does not know the objective's params
    with pytest.raises(ParamsError, match=r"params.yaml: method.arrest.params: phi_deg: .*500"):
        check_registered(p, "params.yaml")


def test_a_top_level_list_is_rejected() -> None:
    with pytest.raises(ParamsError, match="expected a mapping"):
        parse_params([1, 2], "params.yaml")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\ndata: {dataset: [\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_method_settings_merge_key_by_key() -> None:
    raw = base_params_dict()
    name = raw["finetune"]["methods"][0]
    raw["method"][name]["optim"] = {"lr": 0.5}
    raw["method"][name]["attack"] = {"steps": 7}
    p = parse_params(raw)
    r = finetune_job(name, p.method[name], p.finetune.optim, p.threat)
    assert r.optim.lr == 0.5 and r.optim.epochs == p.finetune.optim.epochs      # the rest from finetune.optim
    assert r.attack.steps == 7 and r.attack.eps == p.threat.eps                  # the rest from threat


# --------------------------------------------------------------------------- the CLI
runner = CliRunner()


def _one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the work a training command would do; the list records any call."""
    calls: list[str] = []
    # the stage imports run_training from the package when it runs, so patch it there
    monkeypatch.setattr(pipeline_lib.training, "run_training", lambda *a, **k: calls.append("run_training"))
    return calls


def _write_params(tmp_path: Path, mutate: Mutation | None = None) -> Path:
    raw = copy.deepcopy(base_params_dict())
    if mutate:
        mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train_args(tmp_path: Path, *command: str) -> list[str]:
    return [*command, "--out", str(tmp_path / "m.pt"), "--metrics", str(tmp_path / "m.json"),
            "--history", str(tmp_path / "h.csv")]


@pytest.mark.parametrize("command", [["pretrain"], ["finetune", "pgd_at"], ["evaluate", "standard"]])
def test_cli_rejects_bad_params_before_any_work(tmp_path: Path, no_training: list[str], command: list[str]) -> None:
    params = _write_params(tmp_path, _set("pretrain.optim.milestones", [2, 1]))
    if command[0] == "evaluate":
        args = [*command, "--model", str(tmp_path / "m.pt"), "--metrics", str(tmp_path / "e.json"),
                "--record", str(tmp_path / "e.csv"), "--log", str(tmp_path / "e.log"),
                "--plot", str(tmp_path / "e.png")]
    else:
        args = _train_args(tmp_path, *command)
        if command[0] == "finetune":
            args += ["--pretrained", str(tmp_path / "standard.pt")]
    result = runner.invoke(app, [*args, "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert "invalid params" in result.output and "pretrain.optim" in result.output
    assert "[2, 1]" in _one_line(result.output)
    assert no_training == [] and not list(tmp_path.glob("m.*")) and not (tmp_path / "e.json").exists()


def test_cli_unknown_method_is_named(tmp_path: Path, no_training: list[str]) -> None:
    args = _train_args(tmp_path, "finetune", "madry") + ["--pretrained", str(tmp_path / "s.pt")]
    result = runner.invoke(app, [*args, "--params", str(_write_params(tmp_path))])
    assert result.exit_code == 2
    assert "unknown method 'madry'" in _one_line(result.output)
    assert no_training == []


def test_finetune_without_the_pretrained_checkpoint_says_what_to_run(tmp_path: Path, no_training: list[str]) -> None:
    missing = tmp_path / "models" / "standard.pt"
    args = _train_args(tmp_path, "finetune", "pgd_at") + ["--pretrained", str(missing)]
    result = runner.invoke(app, [*args, "--params", str(_write_params(tmp_path))])
    assert result.exit_code == 2
    out = _one_line(result.output)
    assert str(missing) in out and "dvc repro pretrain" in out
    assert no_training == []


def test_run_training_itself_refuses_a_missing_pretrained_checkpoint(tmp_path: Path) -> None:
    from pipeline_lib.training import TrainOutputs, finetune_job, run_training

    p = parse_params(base_params_dict())
    out = TrainOutputs(tmp_path / "m.pt", tmp_path / "m.json", tmp_path / "h.csv", tmp_path / "s.pt")
    job = finetune_job("pgd_at", p.method["pgd_at"], p.finetune.optim, p.threat)
    with pytest.raises(FileNotFoundError, match="needs the pretrained checkpoint"):
        run_training(job, out, data=p.data, model=p.model, seed=p.seed, runtime=p.runtime,
                     experiment=p.mlflow.experiment, pretrained=tmp_path / "missing.pt")


def test_cli_error_lists_are_printed_literally(tmp_path: Path, no_training: list[str]) -> None:
    """Square brackets in a message are data, not rich markup (which would swallow them)."""
    result = runner.invoke(app, [*_train_args(tmp_path, "pretrain"), "--params",
                                 str(_write_params(tmp_path, _set("evaluate.models", ["standard", "ghost"])))])
    assert result.exit_code == 2
    assert "'ghost'" in result.output and "finetune.methods [" in _one_line(result.output)


def test_profile_composes_and_validates(tmp_path: Path) -> None:
    out = tmp_path / "composed.yaml"
    result = runner.invoke(app, ["profile", "ci", "--base", str(REPO / "params.yaml"), "--out", str(out),
                                 "--profile-dir", str(PROFILE_DIR)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text()) == base_params_dict("ci")
    load_params(out)


def test_profile_unknown_name_fails_clearly(tmp_path: Path) -> None:
    out = tmp_path / "composed.yaml"
    result = runner.invoke(app, ["profile", "ci", "paper_scale_typo", "--base", str(REPO / "params.yaml"),
                                 "--out", str(out), "--profile-dir", str(PROFILE_DIR)])
    assert result.exit_code == 2
    text = _one_line(result.output)
    assert "unknown profile 'paper_scale_typo'" in text and "ci" in text.split("available:")[1]
    assert not out.exists()


def test_profile_that_breaks_validation_is_not_written(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "bad.yaml").write_text("data: {n_train: 0}\n")
    out = tmp_path / "composed.yaml"
    result = runner.invoke(app, ["profile", "bad", "--base", str(REPO / "params.yaml"), "--out", str(out),
                                 "--profile-dir", str(profiles)])
    assert result.exit_code == 2
    assert "data.n_train" in _one_line(result.output) and not out.exists()


def test_profile_composition_replaces_lists_and_merges_mappings() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    assert compose(base, [], PROFILE_DIR) == base
    from pipeline_lib.profiles import deep_merge

    assert deep_merge(base, {"a": {"y": [3]}}) == {"a": {"x": 1, "y": [3]}, "b": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 2}      # inputs untouched
