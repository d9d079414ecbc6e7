"""Estimated GPU hours per stage of a profile: FLOP counts of the real training steps, a stated GPU
throughput, and a measured CPU step time as a sanity check of FLOPs as a cost model (docs/gpu.md).

    python benchmarks/gpu_hours.py --profile cifar10_resnet18 --json /tmp/gpu_hours.json

1. FLOPs (torch.utils.flop_counter.FlopCounterMode: convolutions and matrix products, forward and
   backward, i.e. what a GPU spends its time on) of one training step of every finetune instance and
   of standard pretraining, counted while the objective's own code runs on a small random
   CIFAR-shaped batch (the step of benchmarks/method_step_time.py), per example.
2. Per model and per example: a forward pass F and an attack step A (forward + input-gradient
   backward) of each architecture, and their ratio between ResNet-18 and WRN-34-10.
3. A measured CPU time of a standard training step for both architectures: the time ratio should
   follow the FLOP ratio if FLOPs are the right cost model (the CPU is shared: timings are noisy).
4. Stage FLOPs: training = epochs x (50000 // batch) steps x batch x step FLOPs per example;
   evaluation = the attacks' FLOPs per image (AutoAttack's standard schedule, see `eval_flops`)
   x n_eval; corruption = corruptions x 5 severities x n_images x F. Divided by the GPU throughput.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_step_time import build_bench, timed_step  # noqa: E402 - the same step, not a copy of it

from pipeline_lib.attacks import pgd_linf  # noqa: E402
from pipeline_lib.config import Params, parse_params  # noqa: E402
from pipeline_lib.data import BatchLoader, get_spec  # noqa: E402
from pipeline_lib.io import write_json  # noqa: E402
from pipeline_lib.models import build_model  # noqa: E402
from pipeline_lib.profiles import compose_hydra  # noqa: E402

console = Console()
app = typer.Typer(add_completion=False)
ARCHS = ("resnet18", "wrn34_10")
SEVERITIES = 5


class _Untracked:
    """Stands in for FlopCounterMode's per-module tracker: its backward hooks break
    torch.autograd.grad on a leaf input (every PGD step), and only the total is needed here."""

    parents = {"Global"}

    def __enter__(self) -> _Untracked:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count(fn: Callable[[], object]) -> int:
    """FLOPs (convolutions, matrix products; forward and backward) that fn() runs."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _Untracked()  # type: ignore[assignment]
    with counter:
        fn()
    return counter.get_total_flops()


def model_flops(arch: str, dataset: str, batch: int = 2) -> dict[str, float]:
    """Per example: F (eval forward), A (attack step: forward + input-gradient backward), T (training
    forward + backward of weights and inputs), in FLOPs."""
    spec = get_spec(dataset)
    model = build_model(arch, spec)
    x = torch.rand(batch, spec.channels, spec.image_size, spec.image_size)
    y = torch.arange(batch) % spec.num_classes
    model.eval()
    f = count(lambda: model(x))
    a = count(lambda: pgd_linf(model, x, y, eps=8 / 255, step_size=2 / 255, steps=1))
    model.train()
    t = count(lambda: nn.functional.cross_entropy(model(x), y).backward())
    return {"F": f / batch, "A": a / batch, "T": t / batch}


def step_flops(p: Params, names: list[str], batch: int = 2) -> dict[str, float]:
    """FLOPs per example of one training step of each finetune instance (or objective), counted on
    the profile's architecture with random CIFAR-shaped data."""
    spec = get_spec(p.data.dataset)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(batch, 8), spec.channels, spec.image_size, spec.image_size),
                           generator=g, dtype=torch.uint8)
    labels = torch.arange(len(images)) % spec.num_classes
    loader = BatchLoader(images, labels, batch)
    x, y = next(iter(loader))
    base = build_model(p.model.arch, spec)
    out = {}
    for name in names:
        bench = build_bench(p, name, base, torch.device("cpu"), 0, loader)
        out[name] = count(lambda b=bench: timed_step(b, x, y, torch.device("cpu"))) / batch
    return out


def cpu_step_seconds(arch: str, dataset: str, batch: int, reps: int) -> float:
    """Median wall time of a standard training step (forward, backward, SGD) on this CPU."""
    spec = get_spec(dataset)
    model = build_model(arch, spec).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(batch, spec.channels, spec.image_size, spec.image_size)
    y = torch.arange(batch) % spec.num_classes
    times = []
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if rep:  # the first is warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def eval_flops(m: dict[str, float], n_eval: int, clean: float, robust: float, pgd_steps: int, cw_steps: int,
               autoattack: str) -> float:
    """FLOPs of the evaluate stage for one model (evaluate.cascade: false).

    Clean pass F; FGSM one A + F; PGD / CW: steps x A on the clean-correct images. AutoAttack
    standard attacks only what is still robust: APGD-CE 100 iterations on the clean-correct images,
    then on the images it leaves robust APGD-T 9 targets x 100, FAB-T 9 x 100 (a gradient per
    iteration: ~A) and Square 5000 queries (forward only). `clean`, `robust`: assumed accuracies.
    """
    f, a = m["F"], m["A"]
    per_image = f + (a + f) + clean * (pgd_steps + cw_steps) * a
    if autoattack == "standard":
        per_image += clean * 100 * a + robust * (900 * a + 900 * a + 5000 * f)
    return n_eval * per_image


@app.command()
def main(
    profile: str = typer.Option("cifar10_resnet18", help="profile(s) from conf/profile, comma-separated"),
    tflops: float = typer.Option(94.0, help="effective GPU throughput, TFLOP/s (A100 bf16 at 30% of 312)"),
    eval_tflops: float = typer.Option(47.0, help="effective throughput of evaluation in fp32/TF32 (30% of 156)"),
    clean: float = typer.Option(0.86, help="assumed clean accuracy of the adversarially trained models"),
    robust: float = typer.Option(0.50, help="assumed AutoAttack accuracy of the adversarially trained models"),
    cpu_batch: int = typer.Option(32, help="batch of the measured CPU step"),
    reps: int = typer.Option(3, help="timed CPU steps per architecture (median)"),
    json_out: Path | None = typer.Option(None, "--json", help="write everything to this JSON file"),
) -> None:
    p = parse_params(compose_hydra(profile.split(",")), profile)
    dataset = p.data.dataset
    per_arch = {arch: model_flops(arch, dataset) for arch in ARCHS}
    cpu = {arch: cpu_step_seconds(arch, dataset, cpu_batch, reps) for arch in ARCHS}
    flop_ratio = per_arch["wrn34_10"]["T"] / per_arch["resnet18"]["T"]
    time_ratio = cpu["wrn34_10"] / cpu["resnet18"]
    console.print("per example: " + "; ".join(
        f"{a}: F {m['F'] / 1e9:.3f}, A {m['A'] / 1e9:.3f}, train F+B {m['T'] / 1e9:.3f} GFLOP" for a, m in per_arch.items()))
    console.print(f"WRN-34-10 / ResNet-18: FLOP ratio {flop_ratio:.2f}, measured CPU step-time ratio {time_ratio:.2f} "
                  f"(batch {cpu_batch}: {cpu['resnet18'] * 1e3:.0f} ms vs {cpu['wrn34_10'] * 1e3:.0f} ms; "
                  f"{torch.get_num_threads()} threads; "
                  f"CPU {per_arch['resnet18']['T'] * cpu_batch / cpu['resnet18'] / 1e9:.0f} GFLOP/s)")

    steps_per_epoch = get_spec(dataset).train_size // p.finetune.optim.batch_size
    names = ["standard", *p.finetune.methods]
    per_step = step_flops(p, names)
    m = per_arch[p.model.arch]
    rows = []
    for name in names:
        optim = p.pretrain.optim if name == "standard" else p.method[name].merged_optim(p.finetune.optim)
        steps = optim.epochs * (get_spec(dataset).train_size // optim.batch_size)
        total = steps * optim.batch_size * per_step[name]
        rows.append({"stage": "pretrain" if name == "standard" else f"finetune@{name}", "epochs": optim.epochs,
                     "steps": steps, "x_forward": per_step[name] / m["F"], "pflop": total / 1e15,
                     "gpu_hours": total / (tflops * 1e12) / 3600})
    e = p.evaluate
    for name in e.models:
        c, r = (0.95, 0.0) if name == "standard" else (clean, robust)
        total = eval_flops(m, e.n_eval, c, r, e.pgd.steps, e.cw_settings.steps, e.autoattack.version)
        rows.append({"stage": f"evaluate@{name}", "epochs": None, "steps": None, "x_forward": total / e.n_eval / m["F"],
                     "pflop": total / 1e15, "gpu_hours": total / (eval_tflops * 1e12) / 3600})
    n_corr = len(p.corruption.names) * SEVERITIES * p.corruption.n_images
    for name in e.models:
        total = n_corr * m["F"]
        rows.append({"stage": f"corruption@{name}", "epochs": None, "steps": None, "x_forward": float(n_corr),
                     "pflop": total / 1e15, "gpu_hours": total / (eval_tflops * 1e12) / 3600})

    table = Table(title=f"{profile}: {p.model.arch} on {dataset}, {steps_per_epoch} steps/epoch; training at "
                        f"{tflops:g} TFLOP/s, evaluation at {eval_tflops:g} TFLOP/s")
    for col in ("stage", "epochs", "FLOPs / example-step (x F)", "PFLOP", "GPU hours"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in rows:
        table.add_row(row["stage"], str(row["epochs"] or ""), f"{row['x_forward']:.1f}", f"{row['pflop']:.0f}",
                      f"{row['gpu_hours']:.2f}")
    table.add_row("total", "", "", f"{sum(r['pflop'] for r in rows):.0f}", f"{sum(r['gpu_hours'] for r in rows):.1f}")
    console.print(table)
    if json_out is not None:
        write_json(json_out, {"profile": profile, "per_example_flops": per_arch, "cpu_step_s": cpu,
                              "cpu_batch": cpu_batch, "threads": torch.get_num_threads(), "flop_ratio": flop_ratio,
                              "time_ratio": time_ratio, "tflops": tflops, "eval_tflops": eval_tflops,
                              "assumed_clean": clean, "assumed_robust": robust, "stages": rows})


if __name__ == "__main__":
    app()
