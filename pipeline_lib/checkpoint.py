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
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.spec import get_spec
from .errors import UserError
from .io import atomic_write
from .models import ImageClassifier, build_model

MODEL_FORMAT = "arpipe-model/1"

log = logging.getLogger(__name__)


def save(path: str | Path, obj: dict[str, Any]) -> None:
    """torch.save through an atomic replace: a kill never leaves a truncated file."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


REWRITE = "delete it and rerun the stage that writes it"


class CheckpointError(UserError, ValueError):
    """A checkpoint file is unreadable, not an arpipe checkpoint, or does not fit its header; names the file.

    `problem` is what is wrong (the resume-state recovery reports it alone), `fix` what to do.
    """

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}: {fix}" if fix else problem)
        self.problem = problem


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load(weights_only=True) whose failures name the file and say what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)", REWRITE)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:   # weights_only refused the file: code, objects or garbage
        raise CheckpointError(f"checkpoint {path} was refused by weights-only loading ({_refusal(exc)})",
                              f"arpipe checkpoints hold tensors and primitives only; {REWRITE}") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError) as exc:
        # zip reader / pickle errors of a truncated or foreign file (torch words them in many ways)
        raise CheckpointError(f"checkpoint {path} ({path.stat().st_size} bytes) is truncated or not a torch "
                              f"checkpoint ({type(exc).__name__}: {_first_line(exc)})", REWRITE) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return obj


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to paragraphs)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0].split(". ")[0][:200] if lines else "no message"


def _refusal(exc: BaseException) -> str:
    """Why torch's weights-only unpickler refused a file, without its paragraphs of advice."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"refused global {found.group(1)}"
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue")
    reasons = [p.strip() for p in text.split("\n\n") if p.strip() and not p.strip().startswith(advice)]
    return reasons[0].splitlines()[0][:200] if reasons else "unsupported content"


def load_resume_state(path: str | Path) -> dict[str, Any] | None:
    """A resumable state file (training or evaluation), or None when there is none to resume.

    A state that cannot be read (a kill during a copy, a full disk, a hand edit) is moved
    aside to `<file>.corrupt` with a one-line warning, so the rerun starts that part afresh
    instead of failing on it every time.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load(path)
    except CheckpointError as exc:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log.warning("%s; moved it to %s, starting afresh", exc.problem, aside)
        return None


def save_model(path: str | Path, model: nn.Module, *, arch: str, dataset: str, meta: dict[str, Any]) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save(path, {"format": MODEL_FORMAT, "arch": arch, "dataset": dataset, "state_dict": state, "meta": meta})


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild and load a model checkpoint; returns (model in eval mode, the checkpoint's meta).

    An imported TorchScript checkpoint (arch "torchscript") gives a plain nn.Module with logits only
    (no forward_features): fine for evaluation; training refuses it as an init (its arch is no registry one)."""
    ckpt = load(path)
    fmt = ckpt.get("format")
    if fmt != MODEL_FORMAT:
        if fmt is None and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise CheckpointError(f"{path} is not an arpipe model checkpoint but a bare state_dict ({len(ckpt)} "
                                  f"tensors, no architecture or dataset); use a checkpoint written by the "
                                  f"pretrain/finetune stages ({MODEL_FORMAT}: format, arch, dataset, state_dict, meta)")
        raise CheckpointError(f"{path} is not an arpipe model checkpoint (format={fmt!r}, expected {MODEL_FORMAT!r})")
    missing = [k for k in ("arch", "dataset", "state_dict", "meta") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: the {MODEL_FORMAT} header lacks {', '.join(missing)}")
    if ckpt["arch"] == "torchscript":   # an imported network of any architecture (external.scripted)
        from .external.scripted import load_embedded

        model: nn.Module = load_embedded(ckpt, str(path))
        model.to(device).eval()
        return model, {"arch": ckpt["arch"], "dataset": ckpt["dataset"], **ckpt["meta"]}  # type: ignore[return-value]
    try:
        model = build_model(ckpt["arch"], get_spec(ckpt["dataset"]))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: header names arch={ckpt['arch']!r} on dataset={ckpt['dataset']!r}, "
                              f"which this arpipe cannot build ({_first_line(exc)})") from None
    if not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(f"{path}: state_dict is a {type(ckpt['state_dict']).__name__}, not a dict of tensors")
    mismatch = state_dict_mismatch(model.state_dict(), ckpt["state_dict"])
    if mismatch:
        raise CheckpointError(f"{path}: the header says arch={ckpt['arch']!r} but the weights do not fit it: "
                              f"{mismatch}")
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    return model, {"arch": ckpt["arch"], "dataset": ckpt["dataset"], **ckpt["meta"]}


def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, Any], show: int = 3) -> str:
    """'' when `found` fits `expected` key for key and shape for shape; else a short summary
    (counts and the first `show` names of missing, unexpected and shape-mismatched keys)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = []
    for k, v in expected.items():
        if k in found and not isinstance(found[k], torch.Tensor):
            shapes.append(f"{k} is a {type(found[k]).__name__}")
        elif k in found and found[k].shape != v.shape:
            shapes.append(f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}")
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatched (file vs arch)", shapes)):
        if names:
            more = f", ... {len(names) - show} more" if len(names) > show else ""
            parts.append(f"{len(names)} {label} ({', '.join(names[:show])}{more})")
    return "; ".join(parts)


def check_model_name(meta: dict[str, Any], name: str, path: str | Path, *, allow: bool = False) -> None:
    """The checkpoint must have been trained as `name` (its meta 'method'), the name its metrics go under.

    `allow=True` (the stages' --allow-name-mismatch) evaluates it under another name on purpose.
    A checkpoint that records no method cannot be checked and passes.
    """
    recorded = meta.get("method")
    if allow or recorded is None or recorded == name:
        return
    raise CheckpointError(f"{path} holds the model trained as {recorded!r}, but it is being evaluated as {name!r} "
                          f"(its metrics would be filed under {name!r}); pass the {name!r} checkpoint, or "
                          "--allow-name-mismatch to do this on purpose")


def load_for_run(path: str | Path, device: str | torch.device, *, dataset: str, name: str | None = None,
                 allow_name_mismatch: bool = False, arch: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model at `path` on `device` and its meta, as every stage reads a checkpoint: trained as `name`
    (unless allow_name_mismatch), on the run's `dataset` and, when given, as `arch`; else CheckpointError."""
    model, meta = load_model(path, device)
    if name is not None:
        check_model_name(meta, name, path, allow=allow_name_mismatch)
    if meta["dataset"] != dataset or (arch is not None and meta["arch"] != arch):
        asked = f"model.arch={arch} on " if arch is not None else ""
        raise CheckpointError(f"{path} holds {meta['arch']} on {meta['dataset']}, but params ask for {asked}"
                              f"data.dataset={dataset}", "pass the matching checkpoint or change the params")
    return model, meta


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
