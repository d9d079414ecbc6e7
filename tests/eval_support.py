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
        # BatchNorm running statistics after 40 steps are still an EMA of moving batch statistics
        # (momentum 0.1), so eval-mode accuracy on x sat at 0.25 on one CPU and above on another.
        # Set them to x's own statistics: eval mode then predicts what the fitted train mode does.
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
                    m.momentum = None    # cumulative average: one batch gives its exact statistics
            model(x)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.1
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
