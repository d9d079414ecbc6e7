"""Where the time goes, side by side in one run (issue 15). Prints figures; asserts nothing.

    python benchmarks/speed.py                                  # every section, ~5 minutes on 2 cores
    python benchmarks/speed.py -s autoattack --aa-sizes 16,64,128 --aa-standard-sizes 16,64,128 --reps 3
    python benchmarks/speed.py -s startup -s steps --reps 5

Sections (-s, repeatable; default all):

* startup: each stage from process start to its first real work (its first module forward:
  the first training batch, the evaluation's model check) against a bare `python -c "import
  torch"`; torch-free commands (validate, gate) to their exit. Stages run as `python -m
  stages.cli ...` from this checkout, params.yaml as is, MLflow into a scratch sqlite store.
* steps: one training step of every finetune method of params.yaml against a plain CE step
  (`standard`) and against the method's floor: the forward / backward passes it must make
  (FLOOR_PASSES) times the measured cost of one on the same model and batch.
* attacks: the project's PGD and FGSM against torchattacks' on the same model and batch, when
  torchattacks is installed (it is not a dependency: the section is skipped otherwise).
* autoattack: AutoAttack through the pipeline (`evaluate_model`: model checks, clean pass, the
  resumable cascade) against pyautoattack's `run_standard_evaluation` called directly, at each
  size, on a small CNN fitted for a few seconds (or --aa-model); also checks that both give the
  same per-example robustness.
* pipeline: the default run's compute time by stage, from the committed metrics JSON (`train_time_s`,
  `eval_time_s` under --metrics-dir); start-up is not in these (see `startup`, once per stage).

Timing: the machine may be shared, so every comparison is paired: each repetition runs the
candidate and its reference back to back, alternating which goes first, and the tables show
the median of the per-pair ratios (and of the times).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

console = Console()
app = typer.Typer(add_completion=False)
SECTIONS = ("startup", "steps", "attacks", "autoattack", "pipeline")

# Forward / backward passes of one training step at K attack steps: (forwards without graph,
# forward+backward passes, extra backward passes through an existing graph). Read off each
# objective's loss(): the attack is K forward+backward passes w.r.t. the input.
FLOOR_PASSES: dict[str, Callable[[int], tuple[int, int, int]]] = {
    "standard": lambda k: (0, 1, 0),
    "pgd_at": lambda k: (0, k + 1, 0),
    "trades": lambda k: (1, k + 2, 0),   # p(x) for the attack; CE(x) + KL on two forwards
    "mart": lambda k: (0, k + 2, 0),
    "arrest": lambda k: (2, k + 1, 0),   # teacher features, drift (RGKD + noisy replay)
    "arat": lambda k: (0, k + 2, 0),     # attack through the adversarial BN; clean and adversarial forwards
    "cure": lambda k: (3, k + 2, 2),     # p(x); revision model on x and x_adv; RGP's two gradients
}

# A stage's first real work: the first forward of any module. The hook patches torch's Module
# after torch is imported by the stage itself (numerics pinning must precede that import).
_FIRST_WORK = r"""
import importlib.abc, importlib.machinery, os, sys, time

class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.nn.modules.module":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            def first(*args, **kwargs):
                sys.stderr.write(f"\nSPEED_FIRST_WORK {time.time()!r}\n")
                sys.stderr.flush()
                os._exit(0)
            module.Module.__call__ = first

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Hook())
from stages.cli import app
app(sys.argv[1:], prog_name="arpipe")
"""


def paired(a: Callable[[], float], b: Callable[[], float], reps: int) -> tuple[list[float], list[float]]:
    """reps pairs of (a, b) seconds, alternating which runs first."""
    ta: list[float] = []
    tb: list[float] = []
    for rep in range(reps):
        if rep % 2 == 0:
            ta.append(a())
            tb.append(b())
        else:
            tb.append(b())
            ta.append(a())
    return ta, tb


def median_ratio(ta: Sequence[float], tb: Sequence[float]) -> float:
    return statistics.median(x / y for x, y in zip(ta, tb, strict=True))


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    console.print(t)


# -- startup ------------------------------------------------------------------------------------

def _spawn(args: list[str], env: dict[str, str], first_work: bool) -> float:
    """Seconds from spawning `python args` to its first module forward (first_work) or to its exit."""
    cmd = [sys.executable, "-c", _FIRST_WORK, *args] if first_work else [sys.executable, *args]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    end = time.time()
    if first_work:
        marks = [line for line in proc.stderr.splitlines() if line.startswith("SPEED_FIRST_WORK ")]
        if not marks:
            raise RuntimeError(f"{' '.join(args)} exited ({proc.returncode}) before any forward:\n{proc.stderr[-2000:]}")
        return float(marks[0].split()[1]) - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return end - t0


def section_startup(reps: int) -> None:
    import torch

    from pipeline_lib.checkpoint import save_model
    from pipeline_lib.config import load_params
    from pipeline_lib.data import get_spec
    from pipeline_lib.models import build_model

    p = load_params(REPO / "params.yaml")
    tmp = Path(tempfile.mkdtemp(prefix="speed-startup-"))
    spec = get_spec(p.data.dataset)
    save_model(tmp / "standard.pt", build_model(p.model.arch, spec), arch=p.model.arch, dataset=p.data.dataset,
               meta={"name": "standard"})
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    method = p.finetune.methods[0] if p.finetune.methods else "pgd_at"
    stages: dict[str, tuple[list[str], bool]] = {
        "validate (to exit)": (["-m", "stages.cli", "validate", "--out", str(tmp / "validated")], False),
        "pretrain": (["pretrain", "--out", str(tmp / "s.pt"), "--metrics", str(tmp / "s.json"),
                      "--history", str(tmp / "s.csv")], True),
        f"finetune {method}": (["finetune", method, "--pretrained", str(tmp / "standard.pt"), "--out",
                                str(tmp / "f.pt"), "--metrics", str(tmp / "f.json"), "--history", str(tmp / "f.csv")],
                               True),
        "evaluate standard": (["evaluate", "standard", "--model", str(tmp / "standard.pt"), "--metrics",
                               str(tmp / "e.json"), "--record", str(tmp / "e.csv"), "--log", str(tmp / "e.log"),
                               "--plot", str(tmp / "e.png")], True),
    }
    stages["profile ci (to exit)"] = (["-m", "stages.cli", "profile", "ci", "--out", str(tmp / "ci.yaml")], False)
    summary = REPO / "metrics" / "aggregate" / "summary.json"
    if summary.exists():   # the committed summary against itself: a passing gate
        stages["gate (to exit)"] = (["-m", "stages.cli", "gate", "--baseline", str(summary), "--current",
                                     str(summary)], False)
    floor_args = ["-c", "import torch"]
    for args, first in stages.values():   # warm-up: the page cache, and the scratch MLflow store's migration
        _spawn(args, env, first)
    rows = []
    for name, (args, first) in stages.items():
        ts, tf = paired(lambda: _spawn(args, env, first), lambda: _spawn(floor_args, env, False), reps)
        rows.append((name, statistics.median(ts), statistics.median(tf), median_ratio(ts, tf)))
    table(f"stage start-up against `python -c \"import torch\"` ({reps} pairs, medians)",
          ["command", "to first work s", "import torch s", "x import torch"], rows)


# -- steps --------------------------------------------------------------------------------------

def section_steps(reps: int, batch_size: int) -> None:
    import torch
    import torch.nn.functional as F

    from method_step_time import build_bench, timed_step   # the per-method step as the training loop runs it
    from pipeline_lib.config import load_params
    from pipeline_lib.data import BatchLoader, get_spec, load_train
    from pipeline_lib.models import build_model
    from pipeline_lib.runtime import seed_everything

    p = load_params(REPO / "params.yaml")
    device = torch.device("cpu")
    spec = get_spec(p.data.dataset)
    images, labels = load_train(p.data.dataset, p.data.root, max(batch_size, 1024), p.data.subset_seed)
    loader = BatchLoader(images, labels, batch_size, device=device)
    x, y = next(iter(loader))
    seed_everything(p.seed)
    base = build_model(p.model.arch, spec)
    names = ["standard", *p.finetune.methods]
    benches = {n: build_bench(p, n, base, device, p.seed, loader) for n in names}

    net = copy.deepcopy(base).train()

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            net(x)
        return time.perf_counter() - t0

    def forward_backward() -> float:
        xi = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        F.cross_entropy(net(xi), y).backward()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in names}
    tf: list[float] = []
    tfb: list[float] = []
    for _ in range(2):   # warm-up
        forward(), forward_backward()
        for b in benches.values():
            timed_step(b, x, y, device)
    for rep in range(reps):   # each repetition times everything once, in a rotated order
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            times[n].append(timed_step(benches[n], x, y, device))
        tf.append(forward())
        tfb.append(forward_backward())
    f, fb = statistics.median(tf), statistics.median(tfb)
    rows = []
    for n in names:
        objective = benches[n].objective
        k = objective.ctx.attack.steps
        passes = FLOOR_PASSES.get(objective.name)
        floor = None
        if passes is not None:
            nf, nfb, nb = passes(k)
            floor = nf * f + nfb * fb + nb * (fb - f)
        step = statistics.median(times[n])
        ratio_ce = median_ratio(times[n], times["standard"])
        rows.append((n, 1000 * step, ratio_ce, "-" if floor is None else 1000 * floor,
                     "-" if floor is None else step / floor))
    table(f"training step, {p.model.arch}, batch {batch_size}, {torch.get_num_threads()} threads ({reps} reps, "
          f"medians; one forward {1000 * f:.1f} ms, forward+backward {1000 * fb:.1f} ms)",
          ["method", "step ms", "x CE step", "floor ms", "x floor"], rows)


# -- attacks ------------------------------------------------------------------------------------

def section_attacks(reps: int, batch_size: int) -> None:
    try:
        import torchattacks  # type: ignore[import-not-found]
    except ImportError:
        console.print("attacks: torchattacks is not installed; PGD / FGSM against it skipped (optional extra)")
        return
    import torch

    from pipeline_lib.attacks.fgsm import fgsm_linf
    from pipeline_lib.attacks.pgd import pgd_linf
    from pipeline_lib.config import load_params

    p = load_params(REPO / "params.yaml")
    model, x, y = _fitted_model(p, batch_size)
    eps, steps, alpha = p.threat.eps, p.evaluate.pgd.steps, p.evaluate.pgd.step_size

    def timer(fn: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return run

    gen = torch.Generator().manual_seed(0)
    ours = {"PGD-%d" % steps: lambda: pgd_linf(model, x, y, eps=eps, step_size=alpha, steps=steps, generator=gen),
            "FGSM": lambda: fgsm_linf(model, x, y, eps=eps)}
    theirs = {"PGD-%d" % steps: torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True),
              "FGSM": torchattacks.FGSM(model, eps=eps)}
    rows = []
    for name, fn in ours.items():
        ta, tb = paired(timer(fn), timer(lambda name=name: theirs[name](x, y)), reps)
        rows.append((name, 1000 * statistics.median(ta), 1000 * statistics.median(tb), median_ratio(ta, tb)))
    table(f"attacks on one batch of {batch_size} ({reps} pairs, medians)", ["attack", "ours ms", "torchattacks ms",
                                                                              "x torchattacks"], rows)


# -- autoattack ---------------------------------------------------------------------------------

def _fitted_model(p: Any, n_test: int, model_path: Path | None = None) -> tuple[Any, Any, Any]:
    """(model in eval mode, first n_test test images in [0, 1], labels): --aa-model, else a small CNN
    fitted with CE for one pass over 4096 training images (seconds; enough for attacks to take time)."""
    import torch
    import torch.nn.functional as F

    from pipeline_lib.checkpoint import load_model
    from pipeline_lib.data import get_spec, load_test, load_train
    from pipeline_lib.models import build_model

    if model_path is not None:
        model, _ = load_model(model_path)
    else:
        torch.manual_seed(0)
        model = build_model(p.model.arch, get_spec(p.data.dataset))
        xt, yt = load_train(p.data.dataset, p.data.root, 4096, p.data.subset_seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for i in range(0, len(xt), 128):
            opt.zero_grad()
            F.cross_entropy(model(xt[i:i + 128].float() / 255), yt[i:i + 128]).backward()
            opt.step()
    images, labels = load_test(p.data.dataset, p.data.root, n_test)
    return model.eval().requires_grad_(False), images.float() / 255, labels


def section_autoattack(reps: int, sizes: Sequence[int], standard_sizes: Sequence[int], eps: float,
                       model_path: Path | None) -> None:
    import torch

    from pipeline_lib.config import load_params
    from pipeline_lib.evaluation.autoattack import build_autoattack
    from pipeline_lib.evaluation.benchmark import evaluate_model
    from pipeline_lib.evaluation.config import EvaluateParams

    p = load_params(REPO / "params.yaml")
    model, images, labels = _fitted_model(p, max([*sizes, *standard_sizes]), model_path)
    default_aa = p.evaluate.autoattack.model_dump()
    runs = [(n, "custom", default_aa) for n in sizes] + [(n, "standard", {"version": "standard"})
                                                         for n in standard_sizes]
    rows = []
    for n, label, aa_raw in runs:
        bs = {16: 16, 64: 32}.get(n, 48)   # the sizes: several batches from 64 on
        e = EvaluateParams.model_validate({**p.evaluate.model_dump(), "n_eval": n, "batch_size": bs,
                                           "attacks": ["autoattack"], "eps_sweep": [], "autoattack": aa_raw})
        x, y = images[:n], labels[:n]
        robust: dict[str, Any] = {}

        def pipeline() -> float:
            t0 = time.perf_counter()
            ev = evaluate_model(model, x, y, e, eps=eps, num_classes=10, device=torch.device("cpu"))
            seconds = time.perf_counter() - t0
            robust["pipeline"] = ev.record.robust(list(range(len(ev.steps))))
            return seconds

        def direct() -> float:
            aa = build_autoattack(model, e.autoattack, eps=eps, seed=e.seed, device="cpu")
            t0 = time.perf_counter()
            _, y_adv = aa.run_standard_evaluation(x, y, batch_size=bs)
            seconds = time.perf_counter() - t0
            robust["direct"] = y_adv == y
            return seconds

        ta, tb = paired(pipeline, direct, reps)
        same = bool(torch.equal(robust["pipeline"], robust["direct"]))
        rows.append((f"{label} {n} (batch {bs})", statistics.median(ta), statistics.median(tb), median_ratio(ta, tb),
                     float(robust["direct"].float().mean()), "yes" if same else "NO"))
    table(f"AutoAttack through the pipeline against pyautoattack direct, eps {eps:g} ({reps} pairs, medians)",
          ["version, images", "pipeline s", "direct s", "x direct", "robust acc", "same examples"], rows)


# -- pipeline -----------------------------------------------------------------------------------

def section_pipeline(metrics_dir: Path) -> None:
    rows = []
    for kind, key in (("train", "train_time_s"), ("eval", "eval_time_s"), ("corruption", "eval_time_s")):
        for f in sorted((metrics_dir / kind).glob("*.json")):
            value = json.loads(f.read_text()).get(key)
            if isinstance(value, (int, float)):
                rows.append((f"{kind} {f.stem}", float(value)))
    if not rows:
        console.print(f"pipeline: no timing fields under {metrics_dir}")
        return
    rows.append(("total (compute only)", sum(r[1] for r in rows)))
    table(f"default run's compute time by stage, from {metrics_dir} (start-up per stage not included)",
          ["stage", "seconds"], rows)


@app.command()
def main(
    section: list[str] | None = typer.Option(None, "--section", "-s", help=f"one of {', '.join(SECTIONS)} "
                                             "(repeat; default: all)"),
    reps: int = typer.Option(3, min=1, help="paired repetitions per comparison"),
    batch_size: int = typer.Option(128, min=1, help="training / attack batch (steps, attacks)"),
    aa_sizes: str = typer.Option("16,64,128", help="AutoAttack sizes (params' version), comma-separated"),
    aa_standard_sizes: str = typer.Option("16", help="AutoAttack sizes of the standard version ('' for none)"),
    aa_eps: float = typer.Option(0.02, min=0, help="AutoAttack eps: small enough that every component has work"),
    aa_model: Path | None = typer.Option(None, help="checkpoint to attack instead of the quickly fitted CNN"),
    metrics_dir: Path = typer.Option(REPO / "metrics", help="the default run's metrics (pipeline section)"),
    threads: int | None = typer.Option(None, min=1, help="torch threads (default: torch's)"),
) -> None:
    """Print the start-up, step, attack, AutoAttack and pipeline figures of issue 15 side by side."""
    chosen = section or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise typer.BadParameter(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")

    def sizes(text: str) -> list[int]:
        try:
            return [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise typer.BadParameter(f"sizes must be comma-separated integers, got {text!r}") from None

    aa, aa_std = sizes(aa_sizes), sizes(aa_standard_sizes)
    import torch

    if threads:
        torch.set_num_threads(threads)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
                  f"load average {os.getloadavg()[0]:.1f}")
    if "startup" in chosen:
        section_startup(reps)
    if "steps" in chosen:
        section_steps(reps, batch_size)
    if "attacks" in chosen:
        section_attacks(reps, batch_size)
    if "autoattack" in chosen:
        section_autoattack(reps, aa, aa_std, aa_eps, aa_model)
    if "pipeline" in chosen:
        section_pipeline(metrics_dir)


if __name__ == "__main__":
    app()
