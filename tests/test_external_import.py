"""Importing published checkpoints: key-mapping adapters, TorchScript, provenance, one-line errors.

Each foreign layout is built here from a project model's weights renamed the way the other
codebase names them; the import must give back a network computing the same logits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn
from typer.testing import CliRunner

from datafiles import base_params_dict, write_cifar
from pipeline_lib import checkpoint
from pipeline_lib.config import ParamsError, parse_params
from pipeline_lib.data import DataUnavailableError, get_spec, load_test, load_train
from pipeline_lib.external.config import ExternalModel
from pipeline_lib.external.importer import ImportModelError, import_model
from pipeline_lib.models import build_model
from stages.cli import app


def _project_model(arch: str, dataset: str = "cifar10", seed: int = 0) -> nn.Module:
    """A registry model with non-trivial BatchNorm statistics (so a lost buffer shows in the logits)."""
    torch.manual_seed(seed)
    model = build_model(arch, get_spec(dataset))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("normalize.")}


def _import(tmp_path: Path, obj: Any, **fields: Any) -> tuple[nn.Module, dict[str, Any]]:
    src = tmp_path / "published.pt"
    torch.save(obj, src)
    e = ExternalModel(path=str(src), format="state_dict", dataset=fields.pop("dataset", "cifar10"), **fields)
    import_model(e, "pub", tmp_path / "pub.pt")
    return checkpoint.load_model(tmp_path / "pub.pt")


def _same_logits(a: nn.Module, b: nn.Module, channels: int = 3, size: int = 32) -> None:
    x = torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_resnet18_kuangliu_layout_without_normalisation(tmp_path: Path) -> None:
    """pyautoattack's example / TRADES / AR-AT code: `linear.*` head, the network takes [0, 1] pixels."""
    model = _project_model("resnet18")
    foreign = {("linear." + k[5:] if k.startswith("head.") else k): v for k, v in _weights(model).items()}
    # the original took raw [0, 1] inputs: identity normalisation in the reference, declared none
    model.normalize.mean.zero_()
    model.normalize.std.fill_(1.0)
    imported, meta = _import(tmp_path, foreign, arch="resnet18", normalization="none")
    _same_logits(imported, model)
    assert meta["key_mapping"] == ["rename linear -> head (2 keys)"]
    assert meta["normalization"] == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    assert meta["source_sha256"] == hashlib.sha256((tmp_path / "published.pt").read_bytes()).hexdigest()
    assert meta["source_format"] == "state_dict" and meta["source_path"] == str(tmp_path / "published.pt")


def test_resnet18_dataparallel_with_mu_sigma_buffers_and_fc_head(tmp_path: Path) -> None:
    """`module.` prefix (DataParallel), normalisation stored as mu/sigma buffers, `fc.*` head."""
    model = _project_model("resnet18")
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    model.normalize.mean.copy_(mean.view(1, 3, 1, 1))
    model.normalize.std.copy_(std.view(1, 3, 1, 1))
    foreign = {"module." + ("fc." + k[5:] if k.startswith("head.") else k): v for k, v in _weights(model).items()}
    foreign["module.mu"], foreign["module.sigma"] = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
    imported, meta = _import(tmp_path, foreign, arch="resnet18")
    _same_logits(imported, model)
    assert meta["key_mapping"] == ["normalisation buffers module.mu, module.sigma -> normalize.mean, normalize.std",
                                   f"strip prefix 'module.' ({len(foreign) - 2} keys)", "rename fc -> head (2 keys)"]


def test_sequential_normalize_wrapper_inside_a_training_checkpoint(tmp_path: Path) -> None:
    """nn.Sequential(Normalize, net) saved with its epoch/optimiser under `state_dict`: `0.mean`, `1.*`;
    old checkpoints without num_batches_tracked."""
    model = _project_model("small_cnn", "fashion_mnist")
    sd = {k: v for k, v in _weights(model).items() if not k.endswith("num_batches_tracked")}
    foreign = {"1." + k: v for k, v in sd.items()}
    foreign["0.mean"], foreign["0.std"] = model.normalize.mean.clone(), model.normalize.std.clone()
    imported, meta = _import(tmp_path, {"epoch": 30, "state_dict": foreign, "best_acc": 0.5},
                             arch="small_cnn", dataset="fashion_mnist")
    _same_logits(imported, model, channels=1, size=28)
    assert meta["key_mapping"][0] == "weights under 'state_dict'"
    assert "strip prefix '1.' (" in "; ".join(meta["key_mapping"])
    n_bn = sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in model.modules())
    assert meta["key_mapping"][-1] == f"add num_batches_tracked = 0 ({n_bn} BatchNorm layers)"


def test_wrn34_10_trades_robustbench_layout(tmp_path: Path) -> None:
    """TRADES / RobustBench WideResNet names: `fc`, `convShortcut`, TRADES' unused `sub_block1`."""
    model = _project_model("wrn34_10")
    weights = _weights(model)
    foreign = {("fc." + k[5:] if k.startswith("head.") else k).replace(".conv_shortcut.", ".convShortcut."): v
               for k, v in weights.items()}
    foreign.update({"sub_block1." + k[len("block1."):]: v.clone() for k, v in weights.items()
                    if k.startswith("block1.")})
    imported, meta = _import(tmp_path, foreign, arch="wrn34_10", normalization="dataset")
    got = imported.state_dict()
    assert set(got) == set(model.state_dict())
    for k, v in model.state_dict().items():   # exact weights (a forward pass of WRN-34-10 is slow on CPU)
        assert torch.equal(got[k], v), k
    n_sub = sum(k.startswith("block1.") for k in weights)
    assert meta["key_mapping"] == [f"drop unused sub_block1.* ({n_sub} keys)", "rename fc -> head (2 keys)",
                                   "rename convShortcut -> conv_shortcut (3 keys)"]


def test_already_in_project_layout_needs_no_mapping(tmp_path: Path) -> None:
    model = _project_model("small_cnn", "cifar10")
    imported, meta = _import(tmp_path, _weights(model), arch="small_cnn", normalization="dataset")
    _same_logits(imported, model)
    assert meta["key_mapping"] == []


class _Foreign(nn.Module):
    """An architecture outside the registry: normalised input -> conv -> pooled linear logits."""

    def __init__(self, classes: int = 10, softmax: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Linear(8, classes)
        self.softmax = softmax   # the mistake of exporting probabilities instead of logits

    def forward(self, x: Tensor) -> Tensor:
        logits = self.out(torch.relu(self.conv(x)).mean((2, 3)))   # (B, classes)
        return logits.softmax(1) if self.softmax else logits


def _scripted(tmp_path: Path, module: nn.Module, name: str = "net.ts") -> Path:
    path = tmp_path / name
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_model_is_embedded_and_evaluable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _Foreign()
    path = _scripted(tmp_path, net)
    e = ExternalModel(path=str(path), format="torchscript", dataset="cifar10", normalization="dataset")
    meta = import_model(e, "ts", tmp_path / "ts.pt")
    path.unlink()   # the checkpoint is self-contained
    raw = torch.load(tmp_path / "ts.pt", weights_only=True)   # no pickled code in it
    assert raw["arch"] == "torchscript" and raw["torchscript"].dtype == torch.uint8
    loaded, got_meta = checkpoint.load_model(tmp_path / "ts.pt")
    spec = get_spec("cifar10")
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net((x - mean) / std))
    assert got_meta["source_format"] == "torchscript" and got_meta["source_sha256"] == meta["source_sha256"]

    raw["torchscript"][-30] ^= 1            # a flipped bit in the embedded archive is refused
    checkpoint.save(tmp_path / "tampered.pt", raw)
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        checkpoint.load_model(tmp_path / "tampered.pt")


# ------------------------------------------------------------------ errors: one line, named file
def _one_line(exc: pytest.ExceptionInfo[BaseException], limit: int = 600) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < limit, msg
    return msg


def test_wrong_architecture_is_summarised_not_dumped(tmp_path: Path) -> None:
    with pytest.raises(ImportModelError) as exc:
        _import(tmp_path, _weights(_project_model("small_cnn")), arch="resnet18")
    msg = _one_line(exc)
    assert "published.pt does not match resnet18 on cifar10" in msg
    assert "missing keys (conv1.weight, bn1.weight, bn1.bias, ...)" in msg
    assert "unexpected keys (block1.0.0.weight" in msg


def test_wrong_dataset_channels_and_classes(tmp_path: Path) -> None:
    grey = _weights(_project_model("resnet18", "fashion_mnist"))
    with pytest.raises(ImportModelError) as exc:
        _import(tmp_path, grey, arch="resnet18", dataset="cifar10")
    assert "the network takes 1-channel images, cifar10 has 3 channels" in _one_line(exc)
    ten = _weights(_project_model("resnet18", "cifar10"))
    with pytest.raises(ImportModelError) as exc:
        _import(tmp_path, ten, arch="resnet18", dataset="cifar100")
    assert "the network has 10 classes, cifar100 has 100" in _one_line(exc)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_failing_on_the_probe_batch(tmp_path: Path) -> None:
    class Mnist(nn.Module):   # expects 28x28 grey images
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x.reshape(x.shape[0], 784))

    e = ExternalModel(path=str(_scripted(tmp_path, Mnist())), format="torchscript", dataset="cifar10")
    with pytest.raises(ImportModelError) as exc:
        import_model(e, "ts", tmp_path / "ts.pt")
    assert "fails on a probe batch of cifar10 images (4, 3, 32, 32) in [0, 1]" in _one_line(exc)
    assert not (tmp_path / "ts.pt").exists()

    e = ExternalModel(path=str(_scripted(tmp_path, _Foreign(softmax=True))), format="torchscript", dataset="cifar10")
    with pytest.raises(ImportModelError, match="returns probabilities"):
        import_model(e, "ts", tmp_path / "ts.pt")
    e = ExternalModel(path=str(_scripted(tmp_path, _Foreign(100))), format="torchscript", dataset="cifar10")
    with pytest.raises(ImportModelError, match="returns 100 outputs per example, the dataset has 10 classes"):
        import_model(e, "ts", tmp_path / "ts.pt")


def test_unreadable_and_non_state_dict_files(tmp_path: Path) -> None:
    torch.save(_Foreign(), tmp_path / "pickled.pt")    # a whole pickled module: never unpickled
    e = ExternalModel(path=str(tmp_path / "pickled.pt"), format="state_dict", arch="small_cnn", dataset="cifar10")
    with pytest.raises(ImportModelError) as exc:
        import_model(e, "x", tmp_path / "x.pt")
    assert "cannot be read with torch.load(weights_only=True)" in _one_line(exc)
    with pytest.raises(ImportModelError) as exc:
        _import(tmp_path, {"epoch": 3, "acc": 0.5}, arch="small_cnn")
    assert "not a state_dict" in _one_line(exc)
    e = ExternalModel(path=str(tmp_path / "absent.pt"), format="state_dict", arch="small_cnn", dataset="cifar10")
    with pytest.raises(ImportModelError, match="external.x.path: .*absent.pt does not exist"):
        import_model(e, "x", tmp_path / "x.pt")


def test_declared_and_stored_normalisation_conflict(tmp_path: Path) -> None:
    model = _project_model("small_cnn")
    foreign = {**_weights(model), "mean": torch.zeros(3), "std": torch.ones(3)}
    with pytest.raises(ImportModelError, match="holds its own normalisation"):
        _import(tmp_path, foreign, arch="small_cnn", normalization="dataset")


# ------------------------------------------------------------------ params and the stage
def _params(**external: Any) -> dict[str, Any]:
    raw = base_params_dict("ci")
    raw["external"] = external
    return raw


def test_params_section_is_typed_and_cross_checked() -> None:
    assert parse_params(base_params_dict()).external == {}
    good = {"path": "m.pt", "format": "state_dict", "arch": "resnet18", "dataset": "fashion_mnist"}
    cases = [
        ({**good, "layout": "x"}, "external.pub.layout: unknown key"),
        ({**good, "arch": None}, "format: state_dict needs `arch`"),
        ({**good, "arch": "vit"}, "unknown model 'vit'"),
        ({**good, "format": "torchscript"}, "format: torchscript carries its own architecture"),
        ({**good, "normalization": {"mean": [0.5, 0.5], "std": [1, 1]}}, "2 channels, fashion_mnist has 1"),
    ]
    for entry, expected in cases:
        with pytest.raises(ParamsError, match=expected.replace("(", r"\(").replace("`", ".")):
            parse_params(_params(pub=entry))
    with pytest.raises(ParamsError, match="the name is taken by a trained model"):
        parse_params(_params(pgd_at=good))
    raw = _params(pub=good)
    raw["evaluate"]["models"] = ["standard", "pub"]
    assert parse_params(raw).evaluate.models == ["standard", "pub"]
    raw["evaluate"]["models"] = ["standard", "pubb"]
    with pytest.raises(ParamsError, match="'pubb', which is neither 'standard'.* nor in external \\['pub'\\]"):
        parse_params(raw)
    raw = _params(pub={**good, "dataset": "cifar10"})
    raw["evaluate"]["models"] = ["standard", "pub"]
    with pytest.raises(ParamsError, match="external.pub.dataset=cifar10, but data.dataset=fashion_mnist"):
        parse_params(raw)
    raw = _params(pub=good)
    raw["aggregate"] = {**raw["aggregate"], "reference": "models", "reference_models": ["standard", "pub"]}
    with pytest.raises(ParamsError, match=r"\['pub'\] not in evaluate.models"):
        parse_params(raw)


def test_import_stage_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _project_model("small_cnn", "fashion_mnist")
    torch.save({"module." + k: v for k, v in _weights(model).items()}, tmp_path / "src.pt")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_params(pub={"path": str(tmp_path / "src.pt"), "format": "state_dict",
                                                  "arch": "small_cnn", "dataset": "fashion_mnist",
                                                  "normalization": "dataset", "source": "test"})))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["import-model", "pub", "--out", "models/pub.pt", "-p", str(params)])
    assert result.exit_code == 0, result.output
    imported, meta = checkpoint.load_model(tmp_path / "models" / "pub.pt")
    _same_logits(imported, model, channels=1, size=28)
    assert meta["source"] == "test" and meta["key_mapping"] == [f"strip prefix 'module.' ({len(_weights(model))} keys)"]
    result = CliRunner().invoke(app, ["import-model", "other", "--out", "models/o.pt", "-p", str(params)])
    assert result.exit_code == 2 and "unknown external model 'other'" in result.output


# ------------------------------------------------------------------ evaluation needs the test split only
def test_cifar_test_split_alone_is_enough_for_evaluation(tmp_path: Path) -> None:
    folder, written = write_cifar(tmp_path, "cifar10", n_per_file=6)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").unlink()
    x, _ = load_test("cifar10", tmp_path, 6)
    assert torch.equal(x, torch.from_numpy(written["test_batch"]))
    with pytest.raises(DataUnavailableError, match="lacks data_batch_1, data_batch_2"):
        load_train("cifar10", tmp_path, None, 0)


# ------------------------------------------------------------------ aggregate: an imported model as ARDist reference
def test_imported_model_is_an_ardist_reference_measured_in_this_run(tmp_path: Path) -> None:
    """reference: models fits the curve through this run's standard model and the imported `pub`
    (its own evaluate metrics, not a published number); the trained pgd_at is measured against it."""
    import pandas as pd

    raw = _params(pub={"path": "m.pt", "format": "state_dict", "arch": "small_cnn", "dataset": "fashion_mnist"})
    raw["evaluate"]["models"] = ["standard", "pgd_at", "pub"]
    raw["aggregate"] = {**raw["aggregate"], "reference": "models", "reference_models": ["standard", "pub"],
                        "curve": "linear"}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    (tmp_path / "eval").mkdir()
    # reference line through (90, 0) and (80, 40): robust = -4 clean + 360; pgd_at (85, 30) is 10 above it
    for name, (clean, aa) in {"standard": (0.9, 0.0), "pgd_at": (0.85, 0.3), "pub": (0.8, 0.4)}.items():
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(
            {"clean_acc": clean, "autoattack_acc": aa, "pgd_steps": 5, "n_eval": 100, "eps": 0.1}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["aggregate", "--eval-dir", str(tmp_path / "eval"), "--table",
                                      str(out / "s.csv"), "--markdown", str(out / "s.md"), "--summary",
                                      str(out / "s.json"), "--plot", str(out / "t.png"), "-p", str(params)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "s.csv").set_index("model")
    assert table.loc["pub", "role"] == "reference" and table.loc["pgd_at", "role"] == "method"
    assert table.loc["pgd_at", "ardist"] == pytest.approx(10 / 17 ** 0.5, abs=1e-3)
    assert table.loc["pub", "ardist"] == pytest.approx(0.0, abs=1e-3)
    assert "this run's standard, pub" in (out / "s.md").read_text()


def test_benchmark_reads_the_test_split_and_refuses_bad_inputs(tmp_path: Path) -> None:
    from pipeline_lib.benchmark import benchmark
    from pipeline_lib.evaluation.model_checks import ModelCheckError

    folder, written = write_cifar(tmp_path, "cifar10", n_per_file=6)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").unlink()
    model = _project_model("small_cnn")
    cheap = {"attacks": ["fgsm", "pgd"], "pgd": {"steps": 2, "step_size": 0.005}, "eps_sweep": [0.02]}
    res = benchmark(model, dataset="cifar10", eps=0.01, n_eval=6, data_root=tmp_path, evaluate=cheap)
    assert res.record.n == 6 and [st.name for st in res.steps] == ["fgsm", "pgd", "pgd_eps_0.02"]
    x = torch.from_numpy(written["test_batch"]).float() / 255
    with torch.no_grad():
        assert res.metrics["clean_acc"] == float((model(x).argmax(1) == res.record.labels).float().mean())
    assert set(res.metrics["flags"]) == {"multistep_weaker_than_fgsm", "eps_not_monotone"}
    with pytest.raises(ValueError, match=r"float images in \[0, 1\]"):
        benchmark(model, x * 255, res.record.labels, dataset="cifar10", eps=0.01, evaluate=cheap)
    with pytest.raises(ValueError, match=r"x must be \(N, 3, 32, 32\)"):
        benchmark(model, x[:, :1], res.record.labels, dataset="cifar10", eps=0.01, evaluate=cheap)
    with pytest.raises(ModelCheckError, match="train mode"):
        benchmark(model.train(), x, res.record.labels, dataset="cifar10", eps=0.01, evaluate=cheap)
