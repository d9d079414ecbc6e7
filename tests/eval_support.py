"""Helpers shared by the tests/test_eval_*.py files: a small CNN fitted to a batch, cached per session."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline_lib.evaluation.config import EvaluateParams
from pipeline_lib.evaluation.registry import AttackEnv, AttackStep, plan_steps

_WEIGHTS: dict[tuple[float, int], dict[str, Tensor]] = {}


def fit(model: nn.Module, x: Tensor, y: Tensor, steps: int = 40, lr: float = 1e-2) -> nn.Module:
    """Fit `model` to (x, y) with full-batch Adam (seeded: every session gets the same weights);
    returns it in eval mode. Weights are cached per batch, so a session trains once."""
    key = (round(float(x.sum()), 3), len(x))
    if key not in _WEIGHTS:
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        _WEIGHTS[key] = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_WEIGHTS[key])
    return model.eval()


def eval_params(**overrides: Any) -> EvaluateParams:
    """Cheap evaluate params for unit tests (override any key)."""
    raw: dict[str, Any] = {
        "models": ["standard"], "n_eval": 32, "batch_size": 16, "seed": 0,
        "pgd": {"steps": 5, "step_size": 0.005}, "cw": {"steps": 5, "step_size": 0.005},
        "autoattack": {"version": "custom", "custom": {"attacks": ["apgd-ce", "apgd-t"], "target_classes": 1}},
    }
    raw.update(overrides)
    return EvaluateParams.model_validate(raw)


def steps_for(model: nn.Module, e: EvaluateParams, eps: float) -> list[AttackStep]:
    return plan_steps(e, AttackEnv(model, eps, torch.device("cpu"), e.seed, e.batch_size))
