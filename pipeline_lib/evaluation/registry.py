"""Evaluation attacks by name (the `evaluate.attacks` list), like the objective registry.

A registered builder turns the evaluate params into one or more `AttackStep`s:
the cascade's unit of work, one column of the per-example record. FGSM, PGD and
CW are one step each; AutoAttack is one step per component attack (APGD-CE,
APGD-T, ...), chained the way AutoAttack chains them, so an interrupted
evaluation resumes after the last finished component (or batch).

A step's `run(x, y, generator) -> x_adv` attacks one batch: x (B, C, H, W) in
[0, 1] on the model's device, y (B,) int64; the generator (CPU, seeded per batch
by the cascade) drives any randomness, so a resumed run redraws the same noise.

Each registration carries the attack's `MetricSpec` (label, whether it may be the robust
metric, its gradient-masking orderings, ...): the sanity flags, the aggregate's reader,
table, plot, MLflow and the gate take the attack's column from there, so adding an attack
to the results is its module, its registration here and its params. `eval_metrics()` lists
what the evaluate stage measures, in column order: clean, the attacks in registration
order, worst case.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..registry import Registry
from .metric_spec import AtMost, MetricSpec

if TYPE_CHECKING:
    # torch and the attacks are imported by the builders when they run: the metric declarations
    # are read by torch-free commands (aggregate, gate) too, and torch costs them seconds to import.
    import torch
    from torch import Tensor, nn

    from .config import EvaluateParams

ChunkAttack = Callable[["Tensor", "Tensor", "torch.Generator"], "Tensor"]


@dataclass(frozen=True)
class AttackStep:
    name: str             # record column, e.g. "pgd", "autoattack/apgd-t", "pgd_eps_0.05"
    metric: str           # metrics key it counts towards: "<attack>_acc" (steps sharing it are chained)
    eps: float            # L-inf budget the step must respect (checked on every batch)
    run: ChunkAttack
    worst_case: bool = True   # part of worst_case_acc (the eps sweep is not: it uses other budgets)


@dataclass(frozen=True)
class AttackEnv:
    """What builders need besides the params: the model (eval mode, on `device`) and the threat model."""

    model: nn.Module
    eps: float
    device: torch.device
    seed: int
    batch_size: int


AttackBuilder = Callable[["EvaluateParams", AttackEnv], list[AttackStep]]


@dataclass(frozen=True)
class RegisteredAttack:
    build: AttackBuilder
    metric: MetricSpec   # its column; its steps count towards metric.eval_key


EVAL_ATTACKS: Registry[RegisteredAttack] = Registry("evaluation attack")

CLEAN = MetricSpec("clean", "Clean", role="clean")
WORST_CASE = MetricSpec("worst_case", "Worst case", role="worst_case", robust=True,
                        long_label="worst case over attacks")


def register_attack(name: str, metric: MetricSpec) -> Callable[[AttackBuilder], AttackBuilder]:
    """Register `builder` as attack `name` measuring `metric` (whose key must be the name)."""
    if metric.key != name or metric.role != "attack":
        raise ValueError(f"attack {name!r} must declare a metric with key {name!r} and role 'attack', "
                         f"got key {metric.key!r}, role {metric.role!r}")

    def deco(builder: AttackBuilder) -> AttackBuilder:
        EVAL_ATTACKS.register(name)(RegisteredAttack(builder, metric))
        return builder

    return deco


@contextmanager
def registered_attack(name: str, metric: MetricSpec, builder: AttackBuilder) -> Iterator[None]:
    """`name` registered for the block only (tests: a dummy attack through the whole results path)."""
    register_attack(name, metric)(builder)
    try:
        yield
    finally:
        EVAL_ATTACKS.unregister(name)


def attack_metrics() -> list[MetricSpec]:
    """Every registered attack's metric, in registration order."""
    return [EVAL_ATTACKS.get(name).metric for name in EVAL_ATTACKS.in_order()]


def eval_metrics() -> list[MetricSpec]:
    """What the evaluate stage measures, in column order: clean, every attack, worst case."""
    return [CLEAN, *attack_metrics(), WORST_CASE]


# One step's accuracy above another's: the gradient-masking orderings the attacks declare.
_MULTISTEP = AtMost("fgsm", "multistep_weaker_than_fgsm",
                    "a multi-step attack weaker than one step suggests gradient masking")
_AA_WHY = "AutoAttack should be the stronger attack"


@register_attack("fgsm", MetricSpec("fgsm", "FGSM", role="attack", robust=True))
def _fgsm(e: EvaluateParams, env: AttackEnv) -> list[AttackStep]:
    from ..attacks.fgsm import fgsm_linf

    def run(x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        return fgsm_linf(env.model, x, y, eps=env.eps)

    return [AttackStep("fgsm", "fgsm_acc", env.eps, run)]


@register_attack("pgd", MetricSpec("pgd", "PGD", role="attack", robust=True, at_most=(_MULTISTEP,),
                                   steps_from="pgd_steps"))
def _pgd(e: EvaluateParams, env: AttackEnv) -> list[AttackStep]:
    from ..attacks.pgd import pgd_linf

    s = e.pgd

    def run(x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        return pgd_linf(env.model, x, y, eps=env.eps, step_size=s.step_size, steps=s.steps, restarts=s.restarts,
                        generator=gen)

    return [AttackStep("pgd", "pgd_acc", env.eps, run)]


@register_attack("cw", MetricSpec("cw", "CW", role="attack", robust=True, at_most=(_MULTISTEP,)))
def _cw(e: EvaluateParams, env: AttackEnv) -> list[AttackStep]:
    from ..attacks.cw import cw_linf

    s = e.cw_settings

    def run(x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        return cw_linf(env.model, x, y, eps=env.eps, step_size=s.step_size, steps=s.steps, restarts=s.restarts,
                       generator=gen)

    return [AttackStep("cw", "cw_acc", env.eps, run)]


@register_attack("autoattack", MetricSpec(
    "autoattack", "AutoAttack", role="attack", robust=True,
    at_most=(_MULTISTEP, AtMost("pgd", "autoattack_weaker_than_pgd", _AA_WHY),
             AtMost("cw", "autoattack_weaker_than_pgd", _AA_WHY))))
def _autoattack(e: EvaluateParams, env: AttackEnv) -> list[AttackStep]:
    from .autoattack import build_autoattack, run_component

    # One pyautoattack object for every component and batch: built once, never rebuilt.
    aa = build_autoattack(env.model, e.autoattack, eps=env.eps, seed=env.seed, device=env.device)

    def step(component: str) -> AttackStep:
        def run(x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
            return run_component(aa, component, x, y, batch_size=env.batch_size)  # seeded by aa.seed

        return AttackStep(f"autoattack/{component}", "autoattack_acc", env.eps, run)

    return [step(c) for c in aa.attacks_to_run]


def sweep_metric(eps: float) -> str:
    return f"pgd_acc_eps_{eps:g}"


def sweep_steps(e: EvaluateParams, env: AttackEnv) -> list[AttackStep]:
    """PGD at each `eps_sweep` value, the step size scaled by eps'/eps so the steps cover the ball alike."""
    from ..attacks.pgd import pgd_linf

    s = e.pgd

    def step(eps: float) -> AttackStep:
        step_size = s.step_size * eps / env.eps

        def run(x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
            return pgd_linf(env.model, x, y, eps=eps, step_size=step_size, steps=s.steps, restarts=s.restarts,
                            generator=gen)

        return AttackStep(f"pgd_eps_{eps:g}", sweep_metric(eps), eps, run, worst_case=False)

    return [step(v) for v in e.eps_sweep]


def plan_steps(e: EvaluateParams, env: AttackEnv) -> list[AttackStep]:
    """Every step of one evaluation, in run order: the listed attacks, then the eps sweep."""
    steps = [st for name in e.attacks for st in EVAL_ATTACKS.get(name).build(e, env)]
    return steps + sweep_steps(e, env)
