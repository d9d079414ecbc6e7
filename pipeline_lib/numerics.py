"""CPU numerics pinning (runtime.numerics), applied before torch is imported (docs/reproducibility.md).

The same seed gives different trained weights on two x86-64 machines because three libraries
pick their kernels by the CPU they find: ATen (PyTorch's own ops: reductions, BatchNorm,
elementwise; ATEN_CPU_CAPABILITY), MKL (matrix products; MKL_CBWR) and oneDNN (convolutions;
ONEDNN_MAX_CPU_ISA). An AVX-512 kernel sums in another order than an AVX2 one, the last bits
differ, and PGD's sign steps plus training turn them into a different model.

`portable` pins all three to AVX2, which every x86-64 CPU of the last decade has (an AVX-512
machine then runs the AVX2 kernels of an AVX2 machine); `native` leaves the choice to each
library. The variables are read when torch (MKL, oneDNN) loads, so they must be in the
environment before `import torch`: `stages/cli.py` calls `apply_from_argv` first thing, and
processes it starts (torchrun) inherit them. This module must not import torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

import yaml

Numerics = Literal["portable", "native"]

PORTABLE_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",   # ATen kernels (torch.backends.cpu.get_cpu_capability() -> 'AVX2')
    "MKL_CBWR": "AVX2,STRICT",       # MKL conditional numerical reproducibility, AVX2 code path
    "ONEDNN_MAX_CPU_ISA": "AVX2",    # oneDNN (mkldnn) convolution kernels at most AVX2
}


def apply_numerics(numerics: Numerics) -> dict[str, str]:
    """Set the environment for `numerics` and return what was set. Must run before `import torch`:
    afterwards it raises, since torch would silently keep the kernels it already chose."""
    if numerics == "native":
        return {}
    if numerics != "portable":
        raise ValueError(f"runtime.numerics={numerics!r}; use 'portable' or 'native'")
    if "torch" in sys.modules and any(os.environ.get(k) != v for k, v in PORTABLE_ENV.items()):
        raise RuntimeError("runtime.numerics: portable must be applied before torch is imported")
    os.environ.update(PORTABLE_ENV)
    return dict(PORTABLE_ENV)


def numerics_in(params_file: Path) -> Numerics:
    """runtime.numerics of a params file; the default when the file or key is missing or malformed
    (the stage's own params validation then reports the file with a clear message)."""
    try:
        data = yaml.safe_load(params_file.read_text())
        value = data["runtime"]["numerics"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "portable"
    return value if value in ("portable", "native") else "portable"


def params_path(argv: list[str]) -> Path:
    """The --params/-p file of a stage command line (default params.yaml, as the stages')."""
    for i, arg in enumerate(argv):
        if arg in ("--params", "-p") and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--params="):
            return Path(arg.split("=", 1)[1])
    return Path("params.yaml")


def apply_from_argv(argv: list[str]) -> dict[str, str]:
    """Apply the runtime.numerics of the params file named on a stage command line."""
    return apply_numerics(numerics_in(params_path(argv)))
