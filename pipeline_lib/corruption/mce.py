"""Corruption error relative to the run's standard model (pure functions; the aggregate stage calls them).

ImageNet-C's mCE divides each model's errors by AlexNet's. CIFAR-10-C / CIFAR-100-C have
no AlexNet baseline, so the run's own standard (clean-trained) model takes its place:

    CE_c      = sum_s E_model(c, s) / sum_s E_standard(c, s)        (E = 1 - accuracy)
    mCE_std   = mean over the averaged corruptions c of CE_c

mCE_std < 1: the model errs less than the standard model under corruption; the standard
model itself scores exactly 1. It is not comparable with published ImageNet-C mCE values.
Not computed inside `corruption@<model>`: DVC's matrix cannot make every instance but
`standard` depend on `corruption@standard`, and re-evaluating the standard model in every
instance would double the work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REFERENCE = "standard"


def _errors(metrics: Mapping[str, Any]) -> dict[str, float]:
    """{corruption: summed error over severities} from a corruption@<model> metrics dict."""
    return {m: sum(1.0 - float(a) for a in row.values()) for m, row in metrics["table"].items()}


def relative_corruption_error(model: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """{'mce_vs_standard', 'ce_vs_standard': {c: CE_c}, 'error_ratio'} of `model` against `reference`.

    Both are metrics dicts written by `corruption@<model>`. Only corruptions in both
    tables count; a corruption the reference never gets wrong has no CE (None) and is
    left out of the mean. `error_ratio` = mean corruption error / the reference's.
    """
    mine, ref = _errors(model), _errors(reference)
    shared = [m for m in ref if m in mine]
    if not shared:
        raise ValueError("the two corruption tables share no corruption")
    ce = {m: (mine[m] / ref[m] if ref[m] > 0 else None) for m in shared}
    defined = [v for v in ce.values() if v is not None]
    ref_err = float(reference["mean_corruption_error"])
    return {
        "mce_vs_standard": sum(defined) / len(defined) if defined else None,
        "ce_vs_standard": ce,
        "error_ratio": float(model["mean_corruption_error"]) / ref_err if ref_err > 0 else None,
    }


def relative_to_reference(metrics_by_model: Mapping[str, Mapping[str, Any]],
                          reference: str = REFERENCE) -> dict[str, dict[str, Any]]:
    """`relative_corruption_error` of every model against `metrics_by_model[reference]`."""
    if reference not in metrics_by_model:
        raise KeyError(f"no corruption metrics for the reference model {reference!r}; have: "
                       f"{', '.join(sorted(metrics_by_model))}")
    ref = metrics_by_model[reference]
    return {name: relative_corruption_error(m, ref) for name, m in metrics_by_model.items()}
