"""Split BatchNorm by module surgery: every BN becomes a {clean, adv} pair, everything else stays shared.

AR-AT (Waseda et al., ICLR 2025) normalises clean and adversarial inputs with
separate BatchNorm layers (affine parameters *and* running statistics), because
the two input distributions have different activation statistics, while all
convolution / linear weights are shared. This module does that on any model:

    split_batchnorm(model)             # in place: each _BatchNorm -> SplitBatchNorm(clean, adv)
    with bn_branch(model, "clean"):    # every SplitBatchNorm in `model` uses its clean BN
        logits = model(x)
    plain = merge_branch(model, "adv")  # a copy with ordinary BN modules (the adv branch)

A SplitBatchNorm sits at the dotted name of the BN it replaced, so hooks and
names such as `layer4.0.bn1` keep working, and `merge_branch` gives back a model
whose state_dict has exactly the original architecture's keys (checkpoints and
evaluation need nothing special). New SplitBatchNorms start on the "adv" branch:
the branch used at test time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Branch = Literal["clean", "adv"]
BRANCHES: tuple[str, ...] = get_args(Branch)


def _check_branch(branch: str) -> None:
    if branch not in BRANCHES:
        raise ValueError(f"unknown BatchNorm branch {branch!r}; expected one of {BRANCHES}")


class SplitBatchNorm(nn.Module):
    """Two independent copies of one BatchNorm (any _BatchNorm: 1d/2d/3d); `branch` picks which runs.

    Only the active branch sees the input, so only its running statistics move.
    Input/output shapes are those of the wrapped BN, e.g. (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, bn: _BatchNorm, branch: Branch = "adv") -> None:
        super().__init__()
        _check_branch(branch)
        # Both branches start as copies of the original BN (weights and running stats):
        # when finetuning from a pretrained model neither branch starts from scratch.
        self.clean = copy.deepcopy(bn)
        self.adv = copy.deepcopy(bn)
        self.branch: str = branch
        self.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        return self.adv(x) if self.branch == "adv" else self.clean(x)

    def extra_repr(self) -> str:
        return f"branch={self.branch!r}"


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule at dotted `name`."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def batchnorm_names(model: nn.Module) -> list[str]:
    """Dotted names of the ordinary BatchNorm modules of `model` (not those inside a SplitBatchNorm)."""
    inside_split = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, SplitBatchNorm) for b in BRANCHES}
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and n not in inside_split]


def split_batchnorm(model: nn.Module) -> list[str]:
    """Replace, in place, every BatchNorm of `model` by a SplitBatchNorm; returns the names replaced.

    Idempotent: BNs already inside a SplitBatchNorm are left alone. Raises if the
    model has no BatchNorm at all (then there is nothing to split).
    """
    names = batchnorm_names(model)
    if not names and not split_modules(model):
        raise ValueError(f"{type(model).__name__} has no BatchNorm module to split; "
                         "split BatchNorm needs a model with BatchNorm layers")
    if "" in names:
        raise ValueError("the model itself is a BatchNorm module: wrap it in a container before splitting")
    for name in names:
        parent, attr = _parent(model, name)
        setattr(parent, attr, SplitBatchNorm(getattr(parent, attr)))
    return names


def split_modules(model: nn.Module) -> list[SplitBatchNorm]:
    """Every SplitBatchNorm in `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, SplitBatchNorm)]


def set_branch(model: nn.Module, branch: Branch) -> None:
    """Switch every SplitBatchNorm in `model` to `branch` (a no-op on a model without any)."""
    _check_branch(branch)
    for m in split_modules(model):
        m.branch = branch


@contextmanager
def bn_branch(model: nn.Module, branch: Branch) -> Iterator[nn.Module]:
    """Run the block with every SplitBatchNorm on `branch`; each module's previous branch is restored."""
    _check_branch(branch)
    modules = split_modules(model)
    before = [m.branch for m in modules]
    try:
        for m in modules:
            m.branch = branch
        yield model
    finally:
        for m, b in zip(modules, before, strict=True):
            m.branch = b


def merge_branch(model: nn.Module, branch: Branch) -> nn.Module:
    """A deep copy of `model` with each SplitBatchNorm replaced by its `branch` BN (weights and stats).

    The result has the original (pre-surgery) architecture and state_dict keys.
    """
    _check_branch(branch)
    plain = copy.deepcopy(model)
    names = [n for n, m in plain.named_modules() if isinstance(m, SplitBatchNorm)]
    for name in names:  # splits never nest, so replacing one never renames another
        parent, attr = _parent(plain, name)
        setattr(parent, attr, getattr(getattr(parent, attr), branch))
    return plain
