"""Key-mapping adapters: a state_dict saved by another codebase -> this project's module names.

Layouts the published CIFAR checkpoints use (names read from their code, nothing copied):

* wrappers: `module.` (saved from nn.DataParallel / DistributedDataParallel), `model.`,
  or `1.` when the network sat in nn.Sequential(Normalize, net); also a dict holding the
  weights under `state_dict` / `model_state_dict` / `model` / `net` next to optimiser state.
* normalisation stored in the file: mean/std (or mu/sigma) buffers of one value per channel,
  at the top level or in a wrapper (`normalize.mean`, `norm.std`, `0.mean`, `module.mu`, ...);
  they become this project's `normalize.mean` / `normalize.std` (shape (1, C, 1, 1)).
* ResNet-18 (kuangliu's pytorch-cifar, pyautoattack's example, TRADES / AR-AT code):
  the classifier is `linear.*` (some codebases `fc.*`); this project's is `head.*`.
* WRN-34-10 (TRADES, RobustBench's `WideResNet`, MART, CURE): `fc.*` -> `head.*`,
  `convShortcut` -> `conv_shortcut`, and TRADES' unused `sub_block1.*` is dropped
  (it is built but never called in forward).
* `num_batches_tracked` counters absent from old checkpoints are set to 0 (eval mode never reads them).

`adapt_state_dict` applies the rules that match and reports each one (rule and key count),
which the import records in the checkpoint's provenance. What still does not match is the
caller's to report (see `describe_mismatch`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")
NORM_PAIRS = (("mean", "std"), ("mu", "sigma"))
# target arch -> (old key prefix or infix, new one); a leading "." marks an infix (inside a block).
RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "resnet18": (("linear.", "head."), ("fc.", "head.")),
    "wrn34_10": (("fc.", "head."), (".convShortcut.", ".conv_shortcut.")),
    "small_cnn": (),
}
DROPPED: dict[str, tuple[str, ...]] = {"wrn34_10": ("sub_block1.",)}


@dataclass
class Adapted:
    state_dict: dict[str, Tensor]
    mean: Tensor | None = None          # (C,) normalisation found in the file, if any
    std: Tensor | None = None
    applied: list[str] = field(default_factory=list)   # one line per rule that fired


def unwrap_container(obj: Any) -> tuple[dict[str, Tensor], str | None]:
    """The tensor dict inside a loaded file: the object itself, or its `state_dict`-like entry."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj), None
        for key in CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner), key
    kind = type(obj).__name__
    keys = f" with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else ""
    raise ValueError(f"holds a {kind}{keys}, not a state_dict (a mapping of names to tensors, possibly under "
                     f"one of {', '.join(CONTAINER_KEYS)})")


def _take_normalization(sd: dict[str, Tensor], channels: int, out: Adapted) -> None:
    """Move channel-sized mean/std (mu/sigma) buffers out of sd into out.mean / out.std."""
    for key in sorted(sd):
        prefix, _, leaf = key.rpartition(".")
        for m_name, s_name in NORM_PAIRS:
            s_key = f"{prefix}.{s_name}" if prefix else s_name
            if leaf == m_name and s_key in sd and sd[key].numel() == channels == sd[s_key].numel():
                if out.mean is not None:
                    raise ValueError(f"two normalisations in the file ({key} and an earlier one)")
                out.mean, out.std = sd.pop(key).flatten().float(), sd.pop(s_key).flatten().float()
                out.applied.append(f"normalisation buffers {key}, {s_key} -> normalize.mean, normalize.std")


def _strip_wrappers(sd: dict[str, Tensor], target: Mapping[str, Tensor], out: Adapted) -> dict[str, Tensor]:
    """Strip a first name component every key shares when the target model has no such module."""
    own_first = {k.split(".", 1)[0] for k in target}
    while sd:
        firsts = {k.split(".", 1)[0] for k in sd}
        if len(firsts) != 1 or any("." not in k for k in sd):
            break
        first = firsts.pop()
        if first in own_first:
            break
        sd = {k.split(".", 1)[1]: v for k, v in sd.items()}
        out.applied.append(f"strip prefix '{first}.' ({len(sd)} keys)")
    return sd


def _rename(key: str, old: str, new: str) -> str:
    if old.startswith("."):
        return key.replace(old, new)
    return new + key[len(old):] if key.startswith(old) else key


def adapt_state_dict(sd: Mapping[str, Tensor], arch: str, target: Mapping[str, Tensor], channels: int) -> Adapted:
    """Apply the wrapper / normalisation / naming rules for `arch` that match `sd`.

    target: the project's model state_dict (names and shapes the result should have).
    """
    out = Adapted(dict(sd))
    _take_normalization(out.state_dict, channels, out)
    out.state_dict = _strip_wrappers(out.state_dict, target, out)
    for prefix in DROPPED.get(arch, ()):
        gone = [k for k in out.state_dict if k.startswith(prefix)]
        if gone and not any(k.startswith(prefix) for k in target):
            for k in gone:
                del out.state_dict[k]
            out.applied.append(f"drop unused {prefix}* ({len(gone)} keys)")
    for old, new in RENAMES.get(arch, ()):
        hits = [k for k in out.state_dict if _rename(k, old, new) != k]
        if hits and not any(_rename(k, old, new) != k for k in target):
            out.state_dict = {_rename(k, old, new): v for k, v in out.state_dict.items()}
            shown_old, shown_new = old.strip("."), new.strip(".")
            out.applied.append(f"rename {shown_old} -> {shown_new} ({len(hits)} keys)")
    counters = [k for k in target if k.endswith("num_batches_tracked") and k not in out.state_dict
                and k.rsplit(".", 1)[0] + ".running_mean" in out.state_dict]
    for k in counters:
        out.state_dict[k] = torch.zeros((), dtype=torch.long)
    if counters:
        out.applied.append(f"add num_batches_tracked = 0 ({len(counters)} BatchNorm layers)")
    return out


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def describe_mismatch(sd: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> str | None:
    """One line summarising how sd differs from target (counts and first keys), None if it fits."""
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [k for k in target if k in sd and tuple(sd[k].shape) != tuple(target[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches (first: {k} is {tuple(sd[k].shape)} in the file, "
                     f"{tuple(target[k].shape)} expected)")
    return "; ".join(parts) or None
