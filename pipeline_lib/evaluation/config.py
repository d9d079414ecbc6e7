"""Typed params of the `evaluate` stage (the `evaluate:` section of params.yaml).

eps is not here: evaluation uses the threat model's `threat.eps`. Step sizes
are absolute, in pixel units of [0, 1] images, so each dataset profile sets its
own (CIFAR: 2/255 at eps 8/255, CURE's code 0.003; Fashion-MNIST: 0.025 at eps 0.1).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..schema import StrictModel
from ..errors import UserError

# Attack names pyautoattack 0.2.0 accepts (pyautoattack.autoattack.AttackName).
AutoAttackName = Literal["apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square"]


class PGDEvalParams(StrictModel):
    """L-inf PGD with a uniform random start (also the CW-inf attack: PGD on the CW margin)."""

    steps: int = Field(default=20, ge=1)
    step_size: float = Field(gt=0, le=1)
    restarts: int = Field(default=1, ge=1)


class CustomAutoAttack(StrictModel):
    """The attack list of AutoAttack's 'custom' version, each attack with the standard version's
    settings except the overrides given here."""

    attacks: list[AutoAttackName] = Field(min_length=1)
    apgd_restarts: int | None = Field(default=None, ge=1)    # APGD-CE / APGD-DLR restarts (standard: 1)
    target_classes: int | None = Field(default=None, ge=1)   # APGD-T / FAB-T target classes (standard: 9)
    square_queries: int | None = Field(default=None, ge=1)   # Square queries (standard: 5000)
    # APGD-CE / APGD-DLR / APGD-T iterations (standard: 100): fewer only for smoke tests of big networks
    apgd_iterations: int | None = Field(default=None, ge=1)

    @field_validator("attacks")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"attacks has duplicates: {v}")
        return v


class AutoAttackParams(StrictModel):
    """AutoAttack through pyautoattack.

    version 'standard' (APGD-CE, APGD-T, FAB-T, Square with the published settings) is the
    number to publish; 'plus' the exhaustive variant; 'custom' runs `custom.attacks` (quick
    profiles). `custom` is read by version 'custom' only, so a profile switches to the
    standard version by setting `version` alone.
    """

    version: Literal["standard", "plus", "custom"] = "standard"
    custom: CustomAutoAttack | None = None

    @model_validator(mode="after")
    def _custom_given(self) -> AutoAttackParams:
        if self.version == "custom" and self.custom is None:
            raise ValueError("version: custom needs `custom: {attacks: [...]}`, e.g. attacks: [apgd-ce, apgd-t]")
        return self


class EvaluateParams(StrictModel):
    models: list[str] = Field(min_length=1)   # 'standard' (the pretrained model) and finetune instances
    n_eval: int = Field(ge=1)                 # the first n test images (RobustBench convention)
    batch_size: int = Field(default=500, ge=1)  # every attack's batch; as large as memory allows
    seed: int = 0
    # Attacks run after the clean pass, in this order (names of evaluation.registry.EVAL_ATTACKS).
    attacks: list[str] = Field(default_factory=lambda: ["fgsm", "pgd", "cw", "autoattack"])
    # false: every attack runs on every clean-correct example, so each accuracy is that attack's
    # own (the papers' numbers) and the sanity flags can compare attacks. true: each attack runs
    # only on the examples every earlier attack left robust (AutoAttack's own scheme): cheaper, the
    # same worst case, but each <attack>_acc is then cumulative and attack-vs-attack flags are off.
    cascade: bool = False
    pgd: PGDEvalParams
    cw: PGDEvalParams | None = None           # None: the pgd settings
    autoattack: AutoAttackParams = AutoAttackParams()
    # Extra eps values for a PGD sweep (step size scaled by eps'/eps): pgd_acc_eps_<eps'> metrics
    # and the monotonicity sanity flag.
    eps_sweep: list[float] = Field(default_factory=list)
    # Accuracy gap (fraction) beyond which an ordering that should hold counts as violated.
    sanity_tolerance: float = Field(default=0.005, ge=0, le=1)

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, v: list[str]) -> list[str]:
        from .registry import EVAL_ATTACKS

        for name in v:
            if name not in EVAL_ATTACKS:
                raise ValueError(f"unknown attack {name!r}; registered: {', '.join(EVAL_ATTACKS.names())}")
        if len(set(v)) != len(v):
            raise ValueError(f"attacks has duplicates: {v}")
        return v

    @field_validator("eps_sweep")
    @classmethod
    def _sweep(cls, v: list[float]) -> list[float]:
        bad = [e for e in v if not 0 < e <= 1]
        if bad:
            raise ValueError(f"eps_sweep values must lie in (0, 1], got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"eps_sweep has duplicates: {v}")
        return v

    @property
    def cw_settings(self) -> PGDEvalParams:
        return self.cw if self.cw is not None else self.pgd


STANDARD_TARGET_CLASSES = 9   # AutoAttack's standard APGD-T / FAB-T targets


class EvaluateConfigError(UserError, ValueError):
    """evaluate params that contradict the dataset or the threat model (message names key and value)."""


def check_against(e: EvaluateParams, *, dataset: str, num_classes: int, eps: float) -> None:
    """Cross-checks that need the dataset and threat.eps; run before any data is loaded
    (n_eval against the test set size is checked with the rest of the params, in config.Params)."""
    if eps in e.eps_sweep:
        raise EvaluateConfigError(f"evaluate.eps_sweep contains threat.eps={eps}, which pgd_acc already measures")
    custom = e.autoattack.custom if e.autoattack.version == "custom" else None
    targeted = custom is None or bool({"apgd-t", "fab-t"} & set(custom.attacks))
    targets = (custom.target_classes if custom is not None else None) or STANDARD_TARGET_CLASSES
    if "autoattack" in e.attacks and targeted and targets > num_classes - 1:
        raise EvaluateConfigError(
            f"AutoAttack's targeted attacks use {targets} target classes but {dataset} has only "
            f"{num_classes - 1} other classes: use evaluate.autoattack.version: custom with "
            f"custom.target_classes <= {num_classes - 1}")
