"""Numbers from an `EvalRecord`: accuracy per attack, worst case, AutoAttack's progress, times."""

from __future__ import annotations

from collections.abc import Sequence

from .record import EvalRecord
from .registry import AttackStep


def metric_columns(steps: Sequence[AttackStep], cascade: bool = False) -> dict[str, list[int]]:
    """metrics key -> record columns an example must survive to count as robust for it.

    Independent runs: the metric's own steps. A cascade attacks only what earlier
    steps left robust, so there an attack's accuracy is cumulative: every
    worst-case step up to its last one.
    """
    out: dict[str, list[int]] = {}
    for j, st in enumerate(steps):
        out.setdefault(st.metric, []).append(j)
    if cascade:
        for metric, cols in out.items():
            if steps[cols[0]].worst_case:
                out[metric] = [j for j in range(cols[-1] + 1) if steps[j].worst_case]
    return out


def worst_case_columns(steps: Sequence[AttackStep]) -> list[int]:
    return [j for j, st in enumerate(steps) if st.worst_case]


def accuracies(record: EvalRecord, steps: Sequence[AttackStep], cascade: bool = False) -> dict[str, float]:
    """clean_acc, <attack>_acc per metric key and worst_case_acc (fractions of all N examples).

    An attack's accuracy counts an example robust when it is right on the clean image
    and none of that attack's steps (with `cascade`, none up to them) broke it;
    worst_case_acc when no worst-case step did.
    """
    acc = {"clean_acc": record.accuracy([])}
    acc.update({metric: record.accuracy(cols) for metric, cols in metric_columns(steps, cascade).items()})
    if worst_case_columns(steps):
        acc["worst_case_acc"] = record.accuracy(worst_case_columns(steps))
    return acc


def autoattack_progress(record: EvalRecord, steps: Sequence[AttackStep], cascade: bool = False) -> dict[str, float]:
    """Robust accuracy after each AutoAttack component, as AutoAttack's own log reports it
    (with `cascade`, after the earlier attacks as well)."""
    out: dict[str, float] = {}
    for j, st in enumerate(steps):
        if st.metric == "autoattack_acc":
            cols = [i for i in range(j + 1) if steps[i].metric == st.metric or (cascade and steps[i].worst_case)]
            out[st.name.split("/", 1)[1]] = record.accuracy(cols)
    return out


def step_times(record: EvalRecord, steps: Sequence[AttackStep]) -> dict[str, float]:
    """Compute seconds per attack (metrics key without '_acc'; AutoAttack's components summed) and clean."""
    out = {"clean": round(record.seconds.get("clean", 0.0), 3)}
    for st in steps:
        key = st.metric.removesuffix("_acc").replace("_acc_", "_")
        out[key] = out.get(key, 0.0) + record.seconds.get(st.name, 0.0)
    return {k: round(v, 3) for k, v in out.items()}
