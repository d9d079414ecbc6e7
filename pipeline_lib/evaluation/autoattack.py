"""AutoAttack through the PyPI package `pyautoattack` (the upstream attack code, another API).

The cascade runs AutoAttack one component (APGD-CE, APGD-T, ...) and one batch
at a time, on the examples the earlier components left robust, and records
after each batch. That is exactly what `run_standard_evaluation` does inside
(its batches are consecutive slices of the still-robust indices, and every
component re-seeds torch with the AutoAttack seed before each batch), so the
result equals a one-shot `run_standard_evaluation` example for example
(tests/test_eval_autoattack.py checks it), while a kill loses at most one batch.

`run_component` calls the component's attack object (`aa.apgd.perturb`, ...) the
way `run_standard_evaluation`'s loop does, not `run_standard_evaluation` itself:
that call repeats pyautoattack's model checks (five forwards for randomness, one
under `sys.settrace`) and a clean pass on every call, which per component and
batch cost up to ~6 % over a direct run. The checks run once per AutoAttack
object (on its first batch), as in a direct run; the clean pass is the cascade's own.

pyautoattack's own resumable `state_path` is not used: in 0.2.0 a saved state can
never be restored (its attack set is written as the string "{'apgd-ce', ...}" and
compared with a set, so every restore raises "created with a different set of
attacks"; past that, `y_adv` is unbound on the restore path) and it is not written
atomically.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .config import AutoAttackParams

AA_LOGGER = "auto-attack"   # pyautoattack logs its progress here at DEBUG


def build_autoattack(model: nn.Module, params: AutoAttackParams, *, eps: float, seed: int,
                     device: torch.device | str) -> Any:
    """A pyautoattack.AutoAttack for L-inf `eps` with a fixed seed.

    'custom' starts from the standard version's settings (as applied by pyautoattack
    itself: 1 APGD restart, 9 target classes, 5000 Square queries) and then runs only
    `params.custom.attacks` with the given overrides, set the way upstream documents
    (`adversary.apgd.n_restarts = ...`). pyautoattack's own 'custom' keeps its
    constructor defaults instead (5 APGD restarts), a different attack from standard's.
    """
    from pyautoattack import AutoAttack

    if params.version != "custom" or params.custom is None:
        return AutoAttack(model, version=params.version, norm="Linf", eps=eps, seed=seed, device=device)
    c = params.custom
    aa = AutoAttack(model, version="standard", norm="Linf", eps=eps, seed=seed, device=device)
    aa.version = "custom"
    aa.attacks_to_run = list(c.attacks)
    if c.apgd_restarts is not None:
        aa.apgd.n_restarts = c.apgd_restarts
    if c.target_classes is not None:
        aa.apgd_targeted.n_target_classes = c.target_classes
        aa.fab.n_target_classes = c.target_classes
    if c.square_queries is not None:
        aa.square.n_queries = c.square_queries
    if c.apgd_iterations is not None:
        _rebuild_apgd(aa, c.apgd_iterations, eps=eps, seed=seed, device=device)
    return aa


def _rebuild_apgd(aa: Any, n_iter: int, *, eps: float, seed: int, device: torch.device | str) -> None:
    """APGD with `n_iter` iterations. Its constructor derives the step-size checkpoints from n_iter,
    so the attacks are built anew (pyautoattack's public classes, AutoAttack's own arguments) with
    the restarts / target classes already set carried over."""
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    common = {"n_iter": n_iter, "norm": "Linf", "eps": eps, "seed": seed, "eot_iter": 1, "rho": .75,
              "verbose": False, "device": device, "logger": aa.logger}
    aa.apgd = APGDAttack(aa.model, n_restarts=aa.apgd.n_restarts, **common)
    aa.apgd_targeted = APGDAttack_targeted(aa.model, n_restarts=aa.apgd_targeted.n_restarts,
                                           n_target_classes=aa.apgd_targeted.n_target_classes, **common)


# AutoAttack objects whose model pyautoattack has checked (weak: a finished evaluation frees its object)
_CHECKED: weakref.WeakSet[Any] = weakref.WeakSet()


def run_component(aa: Any, component: str, x: Tensor, y: Tensor, *, batch_size: int) -> Tensor:
    """Run one AutoAttack component on one batch (len(x) <= batch_size): x_adv (B, C, H, W).

    Examples the component does not break come back unchanged; the caller decides
    what broke by predicting on x_adv. pyautoattack's model checks run on the first
    call for `aa` only (they log warnings to the `auto-attack` logger, change nothing).
    """
    if len(x) > batch_size:
        raise ValueError(f"run_component takes one batch: got {len(x)} examples for batch_size={batch_size}")
    if component not in aa.attacks_to_run:
        raise ValueError(f"AutoAttack component {component!r} is not among this object's attacks "
                         f"({', '.join(aa.attacks_to_run)})")
    if aa not in _CHECKED:
        _check_model(aa, x, y, batch_size)
        _CHECKED.add(aa)
    aa.logger.debug("running %s", component)
    with torch.no_grad():   # as run_standard_evaluation: the attacks enable gradients where they need them
        x, y = x.clone().to(aa.device), y.clone().to(aa.device)
        adv = _perturb(aa, component, x, y)
        fooled = ~y.eq(aa.get_logits(adv).max(dim=1)[1])   # (B,) bool, as run_standard_evaluation decides
        x_adv = x.clone()
        x_adv[fooled] = adv[fooled].detach()
    if aa.logger.isEnabledFor(logging.DEBUG):   # (the count waits for the device)
        aa.logger.debug("%s - %d out of %d successfully perturbed", component, int(fooled.sum()), len(x))
    return x_adv


def _check_model(aa: Any, x: Tensor, y: Tensor, batch_size: int) -> None:
    """pyautoattack's checks on the type of defence, as run_standard_evaluation makes them."""
    from pyautoattack import checks

    xb, yb = x[:batch_size].to(aa.device), y[:batch_size].to(aa.device)
    if aa.version != "rand":
        checks.check_randomized(aa.get_logits, xb, yb, bs=batch_size, logger=aa.logger)
    n_cls = checks.check_range_output(aa.get_logits, xb, logger=aa.logger)
    checks.check_dynamic(aa.model, xb, False, logger=aa.logger)
    checks.check_n_classes(n_cls, aa.attacks_to_run, aa.apgd_targeted.n_target_classes, aa.fab.n_target_classes,
                           logger=aa.logger)


def _perturb(aa: Any, component: str, x: Tensor, y: Tensor) -> Tensor:
    """The attack of `component` on (x, y), set and seeded as run_standard_evaluation's loop sets it
    (pyautoattack 0.2.0): the attack object re-seeds torch from `seed` inside `perturb`."""
    if component in ("apgd-ce", "apgd-dlr"):
        aa.apgd.loss = "ce" if component == "apgd-ce" else "dlr"
        attack = aa.apgd
    elif component in ("fab", "fab-t"):
        aa.fab.targeted = component == "fab-t"
        if component == "fab-t":
            aa.fab.n_restarts = 1
        attack = aa.fab
    elif component == "square":
        attack = aa.square
    elif component == "apgd-t":
        attack = aa.apgd_targeted
    else:
        raise ValueError(f"unknown AutoAttack component {component!r}")
    attack.seed = aa.get_seed()
    return attack.perturb(x, y)


@contextmanager
def capture_logs(path: str | Path, names: Sequence[str] = (AA_LOGGER, "pipeline_lib.evaluation")) -> Iterator[Path]:
    """Append the records of `names` (AutoAttack's DEBUG log included) to `path` for the block.

    AutoAttack's per-batch lines go to the file only (not the console); the other
    loggers keep propagating to the console as well. Levels and handlers are restored after.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        if name == AA_LOGGER:
            logger.setLevel(logging.DEBUG)
            logger.propagate = False
        elif logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield path
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        handler.close()
