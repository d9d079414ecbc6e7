"""Training-step time of every registered objective, relative to a standard (clean CE) step.

    python benchmarks/method_step_time.py                       # all objectives, params.yaml's data/model/threat
    python benchmarks/method_step_time.py -m arrest -m arrest_aft --reps 20 --json /tmp/steps.json

Every method runs on the same batch, model architecture and batch size, measured side
by side in one process: each repetition times one step of every method, in an order
rotated per repetition, so load from other processes hits all methods alike. The first
`--warmup` repetitions are discarded; the table shows the median (and quartiles) of the
rest. A step is exactly what the training loop does per batch: zero_grad, loss, backward,
before_optimizer_step, SGD step, after_optimizer_step (prepare_model and on_epoch_start
run once, before timing).

A name is a finetune instance of the params file (its resolved params and attack; the
instance wins when a name is both) or a registered objective (its default params and the
params file's training attack).
Objectives that need a teacher get a freshly initialised, frozen model as teacher and a
copy of it as student (timing does not depend on what the weights have learnt).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline_lib.attacks.training import AttackParams, training_attack
from pipeline_lib.config import Params, ParamsError, load_params
from pipeline_lib.data import BatchLoader, get_spec, load_train
from pipeline_lib.io import write_json
from pipeline_lib.methods import OBJECTIVES, Objective, ObjectiveContext, build_objective
from pipeline_lib.models import build_model
from pipeline_lib.runtime import configure_determinism, resolve_device, seed_everything
from pipeline_lib.schema import StrictModel
from pipeline_lib.training import finetune_job

REFERENCE = "standard"
console = Console()
app = typer.Typer(add_completion=False)


@dataclass
class Bench:
    """One method's objective, model and optimizer, ready to step."""

    name: str
    objective: Objective
    model: nn.Module
    opt: torch.optim.Optimizer
    steps: int = 0


def method_setting(p: Params, name: str) -> tuple[str, StrictModel | None, AttackParams]:
    """(objective, params or None for defaults, training attack) of a finetune instance or objective name."""
    if name in p.method:
        job = finetune_job(name, p.method[name], p.finetune.optim, p.threat)
        return job.objective, job.objective_params, job.attack
    if name in OBJECTIVES:
        return name, None, training_attack(p.threat)
    raise typer.BadParameter(f"{name!r} is neither a registered objective ({', '.join(OBJECTIVES.names())}) "
                             f"nor a finetune instance of the params file ({', '.join(sorted(p.method))})")


def build_bench(p: Params, name: str, base: nn.Module, device: torch.device, seed: int,
                epoch_loader: BatchLoader) -> Bench:
    objective_name, params, attack = method_setting(p, name)
    cls = OBJECTIVES.get(objective_name)
    spec = get_spec(p.data.dataset)
    teacher = copy.deepcopy(base).requires_grad_(False).eval() if cls.needs_teacher else None
    ctx = ObjectiveContext(attack=attack, num_classes=spec.num_classes, device=device,
                           input_shape=(spec.channels, spec.image_size, spec.image_size), teacher=teacher,
                           seed=seed, generator=torch.Generator().manual_seed(seed))
    objective = build_objective(objective_name, params, ctx)
    model = objective.prepare_model(copy.deepcopy(base)).to(device)
    extra = objective.extra_modules().to(device)
    trainable = [q for q in model.parameters() if q.requires_grad] + [q for q in extra.parameters() if q.requires_grad]
    o = p.finetune.optim
    opt = torch.optim.SGD(trainable, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    model.train()
    extra.train()
    objective.on_epoch_start(model, 0, epoch_loader)
    return Bench(name, objective, model, opt)


def timed_step(b: Bench, x: Tensor, y: Tensor, device: torch.device) -> float:
    """Seconds for one training-loop step of `b` on (x, y)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    b.opt.zero_grad(set_to_none=True)
    out = b.objective.loss(b.model, x, y)
    out.loss.backward()
    b.objective.before_optimizer_step(b.model)
    b.opt.step()
    b.steps += 1
    b.objective.after_optimizer_step(b.model, b.steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), "--params", "-p", help="data, model and threat come from here"),
    method: list[str] | None = typer.Option(None, "--method", "-m", help="objective or finetune instance (repeat); "
                                     "default: every registered objective"),
    batch_size: int = typer.Option(128, min=1, help="training batch size"),
    reps: int = typer.Option(10, min=1, help="timed repetitions per method"),
    warmup: int = typer.Option(2, min=0, help="untimed repetitions first"),
    threads: int | None = typer.Option(None, min=1, help="torch threads (default: params runtime.num_threads)"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the results to this JSON file"),
) -> None:
    """Time one training step of each method against a standard step, side by side."""
    try:
        p = load_params(params)
    except ParamsError as exc:
        raise typer.BadParameter(str(exc)) from None
    names = list(dict.fromkeys([REFERENCE, *(method or OBJECTIVES.names())]))
    for name in names:
        method_setting(p, name)  # every name checked before any work
    configure_determinism(p.runtime.deterministic)
    if threads or p.runtime.num_threads:
        torch.set_num_threads(threads or p.runtime.num_threads)  # type: ignore[arg-type]
    device = resolve_device(p.runtime.device)
    spec = get_spec(p.data.dataset)

    n = max(batch_size, 1024)  # on_epoch_start may look at ~1000 images (AR-AT's auto-balance)
    images, labels = load_train(p.data.dataset, p.data.root, n, p.data.subset_seed, p.data.download)
    epoch_loader = BatchLoader(images, labels, batch_size, device=device)
    x, y = next(iter(epoch_loader))
    seed_everything(p.seed)
    base = build_model(p.model.arch, spec).to(device)
    benches = [build_bench(p, name, base, device, p.seed, epoch_loader) for name in names]

    times: dict[str, list[float]] = {b.name: [] for b in benches}
    for rep in tqdm(range(warmup + reps), desc="repetitions"):
        order = benches[rep % len(benches):] + benches[:rep % len(benches)]  # rotate: no position bias
        for b in order:
            dt = timed_step(b, x, y, device)
            if rep >= warmup:
                times[b.name].append(dt)

    ref = statistics.median(times[REFERENCE])
    rows = []
    for name, ts in times.items():
        q1, med, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else (ts[0], ts[0], ts[0])
        rows.append({"method": name, "median_ms": 1000 * med, "q1_ms": 1000 * q1, "q3_ms": 1000 * q3,
                     "relative": med / ref})
    table = Table(title=f"training step, {p.model.arch} on {p.data.dataset}, batch {batch_size}, "
                        f"{reps} reps (median), {torch.get_num_threads()} threads, {device}")
    for col in ("method", "median ms", "quartiles ms", f"x {REFERENCE}"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['median_ms']:.1f}", f"{r['q1_ms']:.1f}-{r['q3_ms']:.1f}",
                      f"{r['relative']:.2f}")
    console.print(table)
    if json_out is not None:
        write_json(json_out, {"arch": p.model.arch, "dataset": p.data.dataset, "batch_size": batch_size,
                              "reps": reps, "warmup": warmup, "threads": torch.get_num_threads(),
                              "device": str(device), "methods": rows})


if __name__ == "__main__":
    app()
