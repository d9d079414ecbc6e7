"""Which numerics knobs change trained weights bit for bit (docs/reproducibility.md).

Trains the default small CNN on the default Fashion-MNIST subset for a few SGD steps, clean
(pretrain) and then PGD-AT (finetune), and prints a SHA-256 of the weights after each phase
together with the CPU dispatch this process ended up with. Run it once per setting; every
setting read before `import torch` (ATEN_CPU_CAPABILITY, MKL_CBWR, ONEDNN_MAX_CPU_ISA,
OMP_NUM_THREADS) must come from the environment, e.g.

    for isa in default avx2; do ATEN_CPU_CAPABILITY=$isa python benchmarks/numerics_probe.py; done
    python benchmarks/numerics_probe.py --no-mkldnn --threads 1

Equal hashes in two runs: bit-identical weights. `--save PATH` keeps the final weights so
`--compare PATH` can print the largest difference to another run's.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import typer


def main(
    steps: int = typer.Option(40, min=1, help="SGD steps per phase (batch 128)"),
    threads: int | None = typer.Option(None, min=1, help="torch intra-op threads (default: torch's)"),
    mkldnn: bool = typer.Option(True, help="torch.backends.mkldnn.enabled"),
    numerics: str | None = typer.Option(None, help="apply runtime.numerics (portable | native) before torch"),
    data_root: Path = typer.Option(Path("data"), help="params data.root"),
    save: Path | None = typer.Option(None, help="write the final weights here"),
    compare: Path | None = typer.Option(None, help="print the largest |difference| to these saved weights"),
) -> None:
    if numerics is not None:
        from pipeline_lib.numerics import apply_numerics
        apply_numerics(numerics)  # type: ignore[arg-type]
    import torch
    import torch.nn.functional as F

    from pipeline_lib.attacks.pgd import pgd_linf
    from pipeline_lib.data import get_spec, load_train
    from pipeline_lib.models import build_model
    from pipeline_lib.runtime import seed_everything

    if threads:
        torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn and torch.backends.mkldnn.enabled
    x, y = load_train("fashion_mnist", data_root, 10000, 0)
    x = x.float().div(255)                                   # (N, 1, 28, 28) in [0, 1]
    seed_everything(0)
    model = build_model("small_cnn", get_spec("fashion_mnist"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()

    def digest() -> str:
        h = hashlib.sha256()
        for v in model.state_dict().values():
            h.update(v.detach().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    out = {}
    for phase in ("clean", "pgd_at"):
        for _ in range(steps):
            idx = torch.randint(len(x), (128,), generator=gen)
            xb, yb = x[idx], y[idx].long()
            if phase == "pgd_at":
                xb = pgd_linf(model, xb, yb, eps=0.1, step_size=0.025, steps=5, random_start=False)
            model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out[phase] = digest()
    elapsed = time.perf_counter() - start
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS",
                                      "OPENBLAS_CORETYPE", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    print(f"capability={torch.backends.cpu.get_cpu_capability()} mkldnn={torch.backends.mkldnn.enabled} "
          f"threads={torch.get_num_threads()} env={env} clean={out['clean']} pgd_at={out['pgd_at']} "
          f"time={elapsed:.1f}s")
    if save is not None:
        torch.save(model.state_dict(), save)
    if compare is not None:
        ref = torch.load(compare, weights_only=True)
        diff = max(float((v - ref[k]).abs().max()) for k, v in model.state_dict().items() if v.is_floating_point())
        print(f"largest |difference| to {compare}: {diff:.3e}")


if __name__ == "__main__":
    typer.run(main)
