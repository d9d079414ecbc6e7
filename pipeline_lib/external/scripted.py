"""TorchScript networks inside a project checkpoint: any architecture, still loaded with weights_only=True.

The checkpoint embeds the TorchScript archive's bytes as a uint8 tensor (key `torchscript`,
with its sha256 in meta) instead of pointing at the file: one self-contained file that DVC
caches, nothing outside the project to go missing or change, and `torch.load(...,
weights_only=True)` still reads it (a tensor, strings, numbers). The archive is then opened
with `torch.jit.load`, which does not unpickle Python objects: a TorchScript archive holds
TorchScript code (compiled by TorchScript's own compiler, not `exec`) and tensors, and its
loader cannot import Python modules, unlike `torch.load(weights_only=False)` on a pickled
nn.Module. The sha256 is checked on every load, so a tampered embedded archive is refused.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..models.base import Normalize

TORCHSCRIPT_ARCH = "torchscript"   # the checkpoint's `arch` for an embedded TorchScript network


class ScriptedClassifier(nn.Module):
    """Normalize (kept in the model, so attacks work on [0, 1] pixels) then the TorchScript network."""

    def __init__(self, net: torch.jit.ScriptModule, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, num_classes) logits."""
        return self.net(self.normalize(x))


def read_script(data: bytes, origin: str) -> torch.jit.ScriptModule:
    """Open TorchScript archive bytes on the CPU; a file that is not one raises ValueError naming `origin`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # torch.jit is deprecated in favour of torch.export
            return torch.jit.load(io.BytesIO(data), map_location="cpu")
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{origin} is not a TorchScript archive ({first})") from None


def embed(data: bytes) -> Tensor:
    """The archive's bytes as a (N,) uint8 tensor (a copy: the tensor owns its memory)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def load_embedded(ckpt: dict[str, Any], path: str) -> ScriptedClassifier:
    """Rebuild the model of a TorchScript project checkpoint (already read with weights_only=True)."""
    data = ckpt["torchscript"].numpy().tobytes()
    expected = ckpt["meta"].get("source_sha256")
    if hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{path}: the embedded TorchScript archive does not match its recorded sha256 {expected}")
    sd = ckpt["state_dict"]
    model = ScriptedClassifier(read_script(data, path), sd["normalize.mean"].flatten().tolist(),
                               sd["normalize.std"].flatten().tolist())
    return model
