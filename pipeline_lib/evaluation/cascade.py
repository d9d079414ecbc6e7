"""Run attack steps over a test set as one resumable cascade, filling an `EvalRecord`.

Order of work: checks on the model, one clean pass (predictions kept in the
record, never recomputed), then each step over its scope in batches:

* scope: the clean-correct examples, minus those an earlier step of the same
  metric already broke (AutoAttack's components chain like this). With
  `cascade=True`, minus those any earlier worst-case step broke: each attack only
  sees what is still robust, as AutoAttack does with its components.
* batches: consecutive slices of `batch_size` of the scope's indices. Each batch
  gets its own generator seeded from (seed, step, first index), so a batch is
  attacked identically whether or not the run was interrupted before it.
* after each batch the record is saved atomically (with a fingerprint of the
  whole configuration) to `state_path`; a rerun with the same fingerprint skips
  finished steps and batches. A different fingerprint starts afresh.

The model runs in eval mode with parameter gradients off (`frozen_params`): the
attacks differentiate with respect to the input only. Every adversarial batch is
checked (within eps of the clean batch, pixels in [0, 1]) before it is counted.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..runtime import frozen_params
from .accuracy import predict
from .model_checks import check_eval_model
from .record import EvalRecord
from .registry import AttackStep

log = logging.getLogger(__name__)

EPS_SLACK = 1e-5   # float32 rounding of x + delta; a real violation is far larger


def batch_seed(seed: int, step: str, first_index: int) -> int:
    """A stable 63-bit seed for one batch of one step (independent of batches before it)."""
    digest = hashlib.sha256(f"{seed}/{step}/{first_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def adversarial_bounds(x: Tensor, x_adv: Tensor) -> Tensor:
    """(4,) float32 on x's device: [non-finite pixels of x_adv, ||x_adv - x||_inf, min and max pixel of x_adv].

    Left on the device: the caller reads it with whatever else it needs from the batch, in one transfer."""
    if not len(x):
        return torch.tensor([0.0, 0.0, 0.0, 1.0], device=x.device)
    return torch.stack([(~torch.isfinite(x_adv)).sum().float(), (x_adv - x).abs().amax(), x_adv.amin(),
                        x_adv.amax()])


def check_adversarial(x: Tensor, x_adv: Tensor, eps: float, step: str, bounds: Sequence[float] | None = None) -> None:
    """x_adv must have x's shape, be finite, lie in [0, 1] and within eps of x (L-inf).

    bounds: `adversarial_bounds(x, x_adv)` already read to the host (otherwise read here)."""
    if x_adv.shape != x.shape:
        raise RuntimeError(f"attack {step} returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}")
    nonfinite, dist, lo, hi = adversarial_bounds(x, x_adv).tolist() if bounds is None else bounds
    if nonfinite:
        raise RuntimeError(f"attack {step} returned non-finite pixels")
    if dist > eps + EPS_SLACK:
        raise RuntimeError(f"attack {step} left the eps ball: ||x_adv - x||_inf = {dist:.6f} > eps = {eps}")
    if lo < 0 or hi > 1:
        raise RuntimeError(f"attack {step} left the image range: pixels in [{lo:.6f}, {hi:.6f}], not [0, 1]")


def step_scope(record: EvalRecord, steps: Sequence[AttackStep], s: int, cascade: bool) -> Tensor:
    """(N,) bool: the examples step s attacks. Depends on finished earlier steps only (resume-stable)."""
    step = steps[s]
    earlier = [j for j in range(s) if steps[j].metric == step.metric
               or (cascade and step.worst_case and steps[j].worst_case)]
    return record.robust(earlier)


def run_cascade(model: nn.Module, x: Tensor, y: Tensor, steps: Sequence[AttackStep], *, batch_size: int,
                seed: int, cascade: bool = False, num_classes: int | None = None,
                state_path: str | Path | None = None, fingerprint: str = "", progress: bool = True,
                desc: str = "evaluate") -> EvalRecord:
    """Evaluate `model` on x (N, C, H, W) in [0, 1], y (N,) (both on the model's device) under `steps`.

    Refuses a model in train mode or one whose outputs are not logits. Returns the
    full record; with `state_path`, resumes from / saves to it (see module docstring).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as images (and at least one): got {len(x)} images, {len(y)} labels")
    names = [st.name for st in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"step names must be unique, got {names}")
    check_eval_model(model, x[:min(len(x), 16)], num_classes)

    record = EvalRecord.load_state(state_path, fingerprint, names) if state_path is not None else None
    if record is not None:
        finished = [n for n, d in zip(names, record.done.tolist(), strict=True) if d]
        log.info("%s: resuming; finished steps: %s", desc, ", ".join(finished) or "none (clean pass only)")
    else:
        if state_path is not None and Path(state_path).exists():
            warnings.warn(f"ignoring {state_path}: it belongs to a different evaluation", RuntimeWarning,
                          stacklevel=2)
        t0 = time.perf_counter()
        clean_pred = predict(model, x, batch_size)
        record = EvalRecord.new(names, y, clean_pred, time.perf_counter() - t0)
        log.info("%s: clean accuracy %.4f (%d/%d)", desc, record.accuracy([]), int(record.clean_correct.sum()),
                 record.n)
        _save(record, state_path, fingerprint)

    with frozen_params(model):
        for s, step in enumerate(steps):
            if record.done[s]:
                continue
            _run_step(model, x, y, record, steps, s, batch_size=batch_size, seed=seed, cascade=cascade,
                      state_path=state_path, fingerprint=fingerprint, progress=progress, desc=desc)
    return record


def _run_step(model: nn.Module, x: Tensor, y: Tensor, record: EvalRecord, steps: Sequence[AttackStep], s: int, *,
              batch_size: int, seed: int, cascade: bool, state_path: str | Path | None, fingerprint: str,
              progress: bool, desc: str) -> None:
    step = steps[s]
    scope = step_scope(record, steps, s, cascade)
    idx = scope.nonzero().squeeze(1)  # (M,) CPU indices; batches are fixed slices of it
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    todo = [b for b in batches if not bool(record.attempted[b, s].all())]
    if len(todo) < len(batches):
        log.info("%s: %s resumes at batch %d/%d", desc, step.name, len(batches) - len(todo) + 1, len(batches))
    for b in tqdm(todo, desc=f"{desc} {step.name}", disable=not progress, leave=False, mininterval=1.0):
        t0 = time.perf_counter()
        on_dev = b.to(x.device)
        xb, yb = x[on_dev], y[on_dev]
        gen = torch.Generator().manual_seed(batch_seed(seed, step.name, int(b[0])))
        x_adv = step.run(xb, yb, gen)
        if x_adv.shape != xb.shape:
            check_adversarial(xb, x_adv, step.eps, step.name)   # raises, naming the shapes
        with torch.no_grad():
            fooled = model(x_adv).argmax(1) != yb   # (B,) bool
            # the batch's one host sync: its bounds and who was fooled, in one transfer
            read = torch.cat([adversarial_bounds(xb, x_adv), fooled.float()]).cpu()
        check_adversarial(xb, x_adv, step.eps, step.name, bounds=read[:4].tolist())
        record.broken[b, s] = read[4:].bool()
        record.attempted[b, s] = True
        record.seconds[step.name] = record.seconds.get(step.name, 0.0) + time.perf_counter() - t0
        _save(record, state_path, fingerprint)
    record.done[s] = True
    _save(record, state_path, fingerprint)
    own = [j for j in range(s + 1) if steps[j].metric == step.metric]
    log.info("%s: %s broke %d of %d attacked; %s after it: %.4f (%.1f s)", desc, step.name,
             int(record.broken[:, s].sum()), len(idx), step.metric, record.accuracy(own),
             record.seconds[step.name])


def _save(record: EvalRecord, state_path: str | Path | None, fingerprint: str) -> None:
    if state_path is not None:
        record.save_state(state_path, fingerprint)
