"""Self-describing checkpoints (nanoGPT style), written atomically, loaded with weights_only=True.

A model checkpoint is a plain dict of tensors and primitives:

    format      "arpipe-model/1"
    arch        registry name of the architecture ("small_cnn", ...)
    dataset     dataset name (gives channels, classes, normalisation)
    state_dict  the model's weights and buffers
    meta        method, objective, resolved config, epochs, metrics, git commit, ...

so `load_model(path)` rebuilds the exact network without any other file.
Training state for resuming (optimizer, scheduler, objective state) lives in a
separate file, see `training.loop`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.spec import get_spec
from .io import atomic_write
from .models import ImageClassifier, build_model

MODEL_FORMAT = "arpipe-model/1"


def save(path: str | Path, obj: dict[str, Any]) -> None:
    """torch.save through an atomic replace: a kill never leaves a truncated file."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def save_model(path: str | Path, model: nn.Module, *, arch: str, dataset: str, meta: dict[str, Any]) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save(path, {"format": MODEL_FORMAT, "arch": arch, "dataset": dataset, "state_dict": state, "meta": meta})


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild and load a model checkpoint; returns (model in eval mode, the checkpoint's meta).

    An imported TorchScript checkpoint (arch "torchscript") gives a plain nn.Module with logits only
    (no forward_features): fine for evaluation; training refuses it as an init (its arch is no registry one)."""
    ckpt = load(path)
    if ckpt.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not an arpipe model checkpoint (format={ckpt.get('format')!r})")
    if ckpt["arch"] == "torchscript":   # an imported network of any architecture (external.scripted)
        from .external.scripted import load_embedded

        model: nn.Module = load_embedded(ckpt, str(path))
    else:
        model = build_model(ckpt["arch"], get_spec(ckpt["dataset"]))
        model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    return model, {"arch": ckpt["arch"], "dataset": ckpt["dataset"], **ckpt["meta"]}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
