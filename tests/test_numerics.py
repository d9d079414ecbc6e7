"""runtime.numerics: a stage process pins ATen, MKL and oneDNN to AVX2 before torch loads.

The subprocess starts with the environment of a machine forced lower (ATEN_CPU_CAPABILITY=default,
ONEDNN_MAX_CPU_ISA=SSE41): `portable` must override it before `import torch` (torch then reports
AVX2 and oneDNN runs AVX2 kernels), `native` must leave it alone. Applied after the import, the
pin would change the environment but not the kernels, and the capability check below fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from datafiles import REPO, python_stdout
from pipeline_lib import numerics

PROBE = """
import sys
sys.argv = ["arpipe", "pretrain", "--params", sys.argv[1]]
import stages.cli  # the stage command's own import: applies runtime.numerics
import os, torch
torch.nn.functional.conv2d(torch.ones(8, 16, 28, 28), torch.ones(16, 16, 3, 3), padding=1)  # a oneDNN conv
print("CAPABILITY", torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_CBWR"), flush=True)
"""

needs_avx2 = pytest.mark.skipif("avx2" not in Path("/proc/cpuinfo").read_text(errors="ignore")
                                if Path("/proc/cpuinfo").exists() else True, reason="needs an x86-64 CPU with AVX2")


def _stage_process(tmp_path: Path, value: str) -> tuple[str, str]:
    """(torch's CPU capability line, oneDNN's ISA line) of a stage process under runtime.numerics=value."""
    params = tmp_path / f"{value}.yaml"
    params.write_text(yaml.safe_dump({"runtime": {"numerics": value}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
           "ONEDNN_VERBOSE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MKL_CBWR", None)
    run = subprocess.run([sys.executable, "-c", PROBE, str(params)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    capability = next(line for line in run.stdout.splitlines() if line.startswith("CAPABILITY"))
    isa = next(line for line in run.stdout.splitlines() if "isa:" in line)
    return capability, isa


@needs_avx2
def test_portable_pins_avx2_before_torch_loads(tmp_path: Path) -> None:
    capability, isa = _stage_process(tmp_path, "portable")
    assert capability == "CAPABILITY AVX2 AVX2,STRICT"
    assert "AVX2" in isa or "AVX 2" in isa, isa


@needs_avx2
def test_native_leaves_the_environment_alone(tmp_path: Path) -> None:
    capability, isa = _stage_process(tmp_path, "native")
    assert capability == "CAPABILITY DEFAULT None"
    assert "AVX2" not in isa and "SSE4.1" in isa, isa


def test_params_file_is_read_from_the_command_line(tmp_path: Path) -> None:
    assert numerics.params_path(["arpipe", "pretrain", "--params", "a.yaml"]) == Path("a.yaml")
    assert numerics.params_path(["arpipe", "evaluate", "m", "-p", "b.yaml"]) == Path("b.yaml")
    assert numerics.params_path(["arpipe", "evaluate", "--params=c.yaml"]) == Path("c.yaml")
    assert numerics.params_path(["arpipe", "pretrain"]) == Path("params.yaml")
    native = tmp_path / "n.yaml"
    native.write_text("runtime: {numerics: native}\n")
    assert numerics.numerics_in(native) == "native"
    assert numerics.numerics_in(tmp_path / "missing.yaml") == "portable"   # the stage then reports the file


def test_pinning_after_torch_loaded_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "torch" in sys.modules and torch is not None
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    with pytest.raises(RuntimeError, match="before torch is imported"):
        numerics.apply_numerics("portable")
    assert numerics.apply_numerics("native") == {}


def test_deterministic_algorithms_on_without_importing_inductor() -> None:
    """configure_determinism(True) turns torch's deterministic mode on (warn-only) in a fresh process without
    loading torch._inductor, whose import `torch.use_deterministic_algorithms` makes (seconds per stage);
    False turns it off again."""
    code = ("import sys, torch\n"
            "from pipeline_lib.runtime import configure_determinism\n"
            "configure_determinism(True)\n"
            "on = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())\n"
            "configure_determinism(False)\n"
            "print(on, torch.are_deterministic_algorithms_enabled(), 'torch._inductor' in sys.modules)\n")
    out = python_stdout(code).strip()
    assert out == "(True, True) False False", out
