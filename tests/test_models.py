"""The model contract, checked on every registered architecture (new registrations are picked up).

Inputs in [0, 1], normalisation inside; forward == forward_head(forward_features);
stable layer names for AR-AT's hooks; checkpoints round-trip with weights_only=True.
WRN-34-10 has 46M parameters (about 2 s per forward of 2 images on this CPU), so each
model is built and run once per module (`Probe`) and the tests share what it showed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline_lib import checkpoint
from pipeline_lib.data import DatasetSpec, get_spec
from pipeline_lib.models import MODELS, ImageClassifier, Normalize, build_model

# The dataset each architecture is used on; architectures registered later default to CIFAR-10.
DATASET_OF = {"small_cnn": "fashion_mnist"}
# The feature layers each model declares, which AR-AT regularises by default: the layers of AR-AT's
# official code (REFERENCE.md, AR-AT) on ResNet-18 and WRN-34-10, the same "last block" recipe on SmallCNN.
# They must exist, run once per forward, and stay these (AR-AT's default results depend on them).
ARAT_LAYERS = {
    "small_cnn": ["block2.0.1", "block2.1.1", "fc_bn"],
    "resnet18": ["layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2"],
    "wrn34_10": [f"block3.layer.{i}.relu{j}" for i in range(5) for j in (1, 2)] + ["pool"],
}
BATCH = 2


def spec_for(arch: str) -> DatasetSpec:
    return get_spec(DATASET_OF.get(arch, "cifar10"))


def _inputs(spec: DatasetSpec, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, spec.channels, spec.image_size, spec.image_size, generator=g)


def _randomise_bn_statistics(model: torch.nn.Module) -> None:
    """Non-default BN running statistics, so a checkpoint that dropped the buffers would be caught."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))


@dataclass
class Probe:
    """One model and what a single forward pass over a fixed batch showed."""

    arch: str
    model: ImageClassifier   # in eval mode
    spec: DatasetSpec
    x: torch.Tensor          # (BATCH, C, H, W) in [0, 1]
    logits: torch.Tensor     # model(x): (BATCH, num_classes)
    features: torch.Tensor   # model.forward_features(x): (BATCH, feature_dim)
    hooked: list[str]        # declared feature layers whose forward hook fired during model(x)


@pytest.fixture(scope="module")
def probes() -> dict[str, Probe]:
    return {}


@pytest.fixture(params=MODELS.names())
def probe(request: pytest.FixtureRequest, probes: dict[str, Probe]) -> Probe:
    arch = request.param
    if arch not in probes:
        spec = spec_for(arch)
        torch.manual_seed(0)
        model = build_model(arch, spec).eval()
        _randomise_bn_statistics(model)
        x = _inputs(spec)
        modules = dict(model.named_modules())
        hooked: list[str] = []
        handles = [modules[n].register_forward_hook(lambda *_, n=n: hooked.append(n))
                   for n in model.feature_layers() if n in modules]
        with torch.no_grad():
            logits = model(x)
            for handle in handles:
                handle.remove()
            features = model.forward_features(x)
        probes[arch] = Probe(arch, model, spec, x, logits, features, hooked)
    return probes[arch]


def test_logits_shape_and_feature_head_split(probe: Probe) -> None:
    assert isinstance(probe.model, ImageClassifier)
    assert probe.logits.shape == (BATCH, probe.spec.num_classes)
    assert probe.features.shape == (BATCH, probe.model.feature_dim)
    assert torch.isfinite(probe.logits).all()
    with torch.no_grad():
        torch.testing.assert_close(probe.model.forward_head(probe.features), probe.logits, rtol=0, atol=0)


def test_normalisation_is_inside_the_model(probe: Probe) -> None:
    norms = [m for m in probe.model.modules() if isinstance(m, Normalize)]
    assert len(norms) == 1, "exactly one Normalize layer, applied to the [0, 1] input"
    norm = norms[0]
    assert norm.mean.flatten().tolist() == pytest.approx(probe.spec.mean)
    assert norm.std.flatten().tolist() == pytest.approx(probe.spec.std)
    # It is used: shifting its mean shifts the logits.
    saved = norm.mean.clone()
    try:
        with torch.no_grad():
            norm.mean.add_(0.5)
            assert not torch.allclose(probe.model(probe.x), probe.logits)
    finally:
        norm.mean.copy_(saved)


def test_declared_feature_layers_exist_and_run(probe: Probe) -> None:
    names = probe.model.feature_layers()
    modules = dict(probe.model.named_modules())
    assert names and [n for n in names if n not in modules] == []
    assert sorted(probe.hooked) == sorted(names), "every feature layer runs exactly once per forward"
    if probe.arch in ARAT_LAYERS:
        assert names == ARAT_LAYERS[probe.arch]


def test_checkpoint_round_trip(probe: Probe, tmp_path: Path) -> None:
    model = probe.model
    path = tmp_path / f"{probe.arch}.pt"
    checkpoint.save_model(path, model, arch=probe.arch, dataset=probe.spec.name, meta={"method": "t", "epoch": 3})

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == checkpoint.MODEL_FORMAT
    assert (raw["arch"], raw["dataset"]) == (probe.arch, probe.spec.name)
    loaded, meta = checkpoint.load_model(path)
    assert type(loaded) is type(model) and not loaded.training
    assert meta == {"arch": probe.arch, "dataset": probe.spec.name, "method": "t", "epoch": 3}
    expected_state, got_state = model.state_dict(), loaded.state_dict()
    assert expected_state.keys() == got_state.keys()
    assert all(torch.equal(expected_state[k], got_state[k]) for k in expected_state)
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe.x), probe.logits, rtol=0, atol=0)


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(KeyError, match="'vgg99'.*small_cnn"):
        build_model("vgg99", get_spec("cifar10"))


def test_small_cnn_takes_cifar_too() -> None:
    """Global pooling keeps the CPU default usable on 32x32 RGB (the small CIFAR profiles)."""
    spec = get_spec("cifar100")
    model = build_model("small_cnn", spec).eval()
    with torch.no_grad():
        assert model(_inputs(spec)).shape == (BATCH, 100)
