"""The per-example record of an evaluation: which attack broke which test image.

In memory (and in the resumable state file) it is a few tensors over the N
evaluated examples and the S cascade steps:

    labels      (N,)   int64  true class
    clean_pred  (N,)   int64  prediction on the clean image
    broken      (N, S) bool   step s's adversarial image is misclassified
    attempted   (N, S) bool   step s has attacked example n (its batch is finished)
    done        (S,)   bool   step s has finished every batch

As a stage output it is a CSV, one row per example: index, label, clean_pred,
clean_correct, one column per step (1 broken, 0 attacked and still right, empty
not attacked: wrong on clean images, or outside the step's scope) and `robust`
(right on the clean image and under every attack counted in worst_case_acc).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .. import checkpoint
from ..io import atomic_write

STATE_FORMAT = "arpipe-eval-state/1"


@dataclass
class EvalRecord:
    steps: list[str]
    labels: Tensor
    clean_pred: Tensor
    broken: Tensor
    attempted: Tensor
    done: Tensor
    seconds: dict[str, float] = field(default_factory=dict)   # compute time per step, and "clean"

    @classmethod
    def new(cls, steps: Sequence[str], labels: Tensor, clean_pred: Tensor, clean_seconds: float) -> EvalRecord:
        n, s = len(labels), len(steps)
        return cls(list(steps), labels.cpu(), clean_pred.cpu(), torch.zeros(n, s, dtype=torch.bool),
                   torch.zeros(n, s, dtype=torch.bool), torch.zeros(s, dtype=torch.bool),
                   {"clean": clean_seconds, **{name: 0.0 for name in steps}})

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def clean_correct(self) -> Tensor:
        return self.clean_pred == self.labels

    def column(self, step: str) -> int:
        return self.steps.index(step)

    def robust(self, columns: Sequence[int]) -> Tensor:
        """(N,) bool: right on the clean image and not broken by any of `columns`."""
        if not columns:
            return self.clean_correct
        return self.clean_correct & ~self.broken[:, list(columns)].any(1)

    def accuracy(self, columns: Sequence[int]) -> float:
        """Fraction of the N examples robust to `columns` (an exact count / N, not a float32 mean)."""
        return int(self.robust(columns).sum()) / self.n

    # ---- resumable state -------------------------------------------------------------------------
    def save_state(self, path: str | Path, fingerprint: str) -> None:
        checkpoint.save(path, {"format": STATE_FORMAT, "fingerprint": fingerprint, "steps": self.steps,
                               "labels": self.labels, "clean_pred": self.clean_pred, "broken": self.broken,
                               "attempted": self.attempted, "done": self.done, "seconds": self.seconds})

    @classmethod
    def load_state(cls, path: str | Path, fingerprint: str, steps: Sequence[str]) -> EvalRecord | None:
        """The saved record if it belongs to this exact evaluation (same fingerprint and steps), else None."""
        state = checkpoint.load_resume_state(path)   # unreadable: moved aside, the evaluation starts afresh
        if state is None:
            return None
        if (state.get("format") != STATE_FORMAT or state.get("fingerprint") != fingerprint
                or list(state.get("steps", [])) != list(steps)):
            return None
        return cls(list(state["steps"]), state["labels"], state["clean_pred"], state["broken"],
                   state["attempted"], state["done"], dict(state["seconds"]))

    # ---- stage output ----------------------------------------------------------------------------
    def write_csv(self, path: str | Path, worst_case_columns: Sequence[int]) -> None:
        # Plain lists first: indexing tensors cell by cell costs microseconds each.
        robust = self.robust(worst_case_columns).tolist()
        broken, attempted = self.broken.tolist(), self.attempted.tolist()
        labels, preds, correct = self.labels.tolist(), self.clean_pred.tolist(), self.clean_correct.tolist()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["index", "label", "clean_pred", "clean_correct", *self.steps, "robust"])
        for i in range(self.n):
            cells = [str(int(b)) if a else "" for a, b in zip(attempted[i], broken[i], strict=True)]
            writer.writerow([i, labels[i], preds[i], int(correct[i]), *cells, int(robust[i])])
        atomic_write(path, lambda fh: fh.write(buf.getvalue().encode()))


def read_record_csv(path: str | Path) -> dict[str, list[str]]:
    """The record CSV as columns of strings (for tests and quick analysis without pandas)."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    return {name: [r[j] for r in body] for j, name in enumerate(header)}
