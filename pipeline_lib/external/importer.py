"""`import_model(spec, out)`: a published checkpoint (local file) -> a project checkpoint "arpipe-model/1".

Every check runs before anything is written, and each failure is one line naming the file:
the file cannot be read with weights_only=True, its keys do not match the declared
architecture (counts and the first few keys), it was made for another dataset (input
channels, number of classes), or the network fails on a probe batch or returns no logits.

Provenance in the checkpoint's meta: source path, sha256, format, source citation, the
key-mapping rules applied and the normalisation used (so a reader sees what was changed).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import checkpoint
from ..data.spec import DatasetSpec, get_spec
from ..evaluation.model_checks import ModelCheckError, check_logits
from ..models import build_model
from .config import ExternalModel, MeanStd
from .layouts import adapt_state_dict, describe_mismatch, unwrap_container
from .scripted import TORCHSCRIPT_ARCH, ScriptedClassifier, embed, read_script

PROBE_BATCH = 4


class ImportModelError(ValueError):
    """The file cannot become a project checkpoint as declared (one line: file and reason)."""


def probe_batch(spec: DatasetSpec) -> Tensor:
    """(4, C, H, W) seeded uniform images in [0, 1] of the dataset's shape."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(PROBE_BATCH, spec.channels, spec.image_size, spec.image_size, generator=g)


def _declared_normalization(e: ExternalModel, spec: DatasetSpec) -> tuple[list[float], list[float]] | None:
    """mean/std the params declare; None for 'auto' (the file decides)."""
    if isinstance(e.normalization, MeanStd):
        return e.normalization.mean, e.normalization.std
    if e.normalization == "dataset":
        return list(spec.mean), list(spec.std)
    if e.normalization == "none" or e.format == "torchscript":
        return [0.0] * spec.channels, [1.0] * spec.channels
    return None


def _dataset_hint(sd: dict[str, Tensor], target: dict[str, Tensor], spec: DatasetSpec) -> str | None:
    """A wrong-dataset diagnosis from the first convolution's input channels and the head's classes."""
    first_conv = next(k for k, v in target.items() if v.ndim == 4)
    if first_conv in sd and sd[first_conv].ndim == 4 and sd[first_conv].shape[1] != spec.channels:
        return (f"the network takes {sd[first_conv].shape[1]}-channel images, {spec.name} has "
                f"{spec.channels} channels (dataset mismatch)")
    head = "head.weight"
    if head in sd and head in target and sd[head].ndim == 2 and sd[head].shape[0] != spec.num_classes:
        return (f"the network has {sd[head].shape[0]} classes, {spec.name} has {spec.num_classes} "
                "(dataset mismatch)")
    return None


def _read_weights(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ImportModelError(f"{path} cannot be read with torch.load(weights_only=True) ({first[:200]}); "
                               "save its state_dict (model.state_dict()) instead, or export it to TorchScript "
                               "(format: torchscript)") from None


def _from_state_dict(e: ExternalModel, path: Path, spec: DatasetSpec) -> tuple[nn.Module, dict[str, Any]]:
    assert e.arch is not None   # checked by ExternalModel
    loaded = _read_weights(path)
    try:
        sd, container = unwrap_container(loaded)
    except ValueError as exc:
        raise ImportModelError(f"{path} {exc}") from None
    model = build_model(e.arch, spec)
    target = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    try:
        adapted = adapt_state_dict(sd, e.arch, target, spec.channels)
    except ValueError as exc:
        raise ImportModelError(f"{path}: {exc}") from None
    applied = ([f"weights under '{container}'"] if container else []) + adapted.applied
    declared = _declared_normalization(e, spec)
    if adapted.mean is not None and declared is not None:
        raise ImportModelError(f"{path} holds its own normalisation but external normalization="
                               f"{e.normalization!r} declares one: set normalization: auto to use the file's")
    mean, std = (adapted.mean.tolist(), adapted.std.tolist()) if adapted.mean is not None else \
        declared or ([0.0] * spec.channels, [1.0] * spec.channels)
    mismatch = describe_mismatch(adapted.state_dict, target)
    if mismatch:
        hint = _dataset_hint(adapted.state_dict, target, spec)
        done = f" after mapping [{'; '.join(applied)}]" if applied else ""
        raise ImportModelError(f"{path} does not match {e.arch} on {spec.name}"
                               f"{': ' + hint + '; ' if hint else ': '}{mismatch}{done}")
    model.load_state_dict({**adapted.state_dict, "normalize.mean": torch.tensor(mean).view(1, -1, 1, 1),
                           "normalize.std": torch.tensor(std).view(1, -1, 1, 1)})
    return model, {"key_mapping": applied, "normalization": {"mean": mean, "std": std}}


def _from_torchscript(e: ExternalModel, path: Path, spec: DatasetSpec) -> tuple[nn.Module, dict[str, Any], Tensor]:
    data = path.read_bytes()
    try:
        net = read_script(data, str(path))
    except ValueError as exc:
        raise ImportModelError(str(exc)) from None
    mean, std = _declared_normalization(e, spec) or ([0.0] * spec.channels, [1.0] * spec.channels)
    return ScriptedClassifier(net, mean, std), {"key_mapping": [], "normalization": {"mean": mean, "std": std}}, \
        embed(data)


def _probe(model: nn.Module, path: Path, spec: DatasetSpec) -> None:
    """The model must run on a batch of the dataset's images and return logits for its classes."""
    x = probe_batch(spec)
    model.eval()
    try:
        check_logits(model, x, spec.num_classes)
    except ModelCheckError as exc:
        raise ImportModelError(f"{path}: {exc} (probe batch {tuple(x.shape)} of {spec.name} images)") from None
    except Exception as exc:  # a foreign network can fail in any way on the wrong input
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ImportModelError(f"{path} fails on a probe batch of {spec.name} images {tuple(x.shape)} in [0, 1]: "
                               f"{type(exc).__name__}: {first[:200]}") from None


def import_model(e: ExternalModel, name: str, out: str | Path) -> dict[str, Any]:
    """Check and convert `e.path` into the project checkpoint `out`; returns the meta written."""
    path = Path(e.path)
    if not path.is_file():
        raise ImportModelError(f"external.{name}.path: {path} does not exist")
    spec = get_spec(e.dataset)
    embedded: Tensor | None = None
    if e.format == "state_dict":
        model, info = _from_state_dict(e, path, spec)
    else:
        model, info, embedded = _from_torchscript(e, path, spec)
    _probe(model, path, spec)
    meta: dict[str, Any] = {"method": name, "objective": "external", "source_path": str(path),
                            "source_sha256": checkpoint.file_sha256(path), "source_format": e.format,
                            "source": e.source, **info}
    arch = e.arch if e.format == "state_dict" else TORCHSCRIPT_ARCH
    if embedded is None:
        checkpoint.save_model(out, model, arch=arch, dataset=e.dataset, meta=meta)
    else:
        norm = {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith("normalize.")}
        checkpoint.save(out, {"format": checkpoint.MODEL_FORMAT, "arch": arch, "dataset": e.dataset,
                              "state_dict": norm, "torchscript": embedded, "meta": meta})
    return meta
