"""Red flags for gradient masking (Carlini et al. 2019, "On evaluating adversarial robustness").

Orderings that hold for an honest evaluation of a model without masked gradients (each
attack declares its own in its registration, `MetricSpec.at_most`; these are the built-in ones):

* multistep_weaker_than_fgsm: PGD, CW and AutoAttack (many steps) leave at most
  FGSM's (one step) accuracy.
* autoattack_weaker_than_pgd: AutoAttack leaves at most PGD's and CW's accuracy.
* eps_not_monotone: robust accuracy falls as eps grows (never rises, and does not
  stay flat across the whole sweep while above zero).

Each flag compares independent per-attack accuracies (evaluate.cascade: false); with
a cascade, accuracies are cumulative and only the eps check (its sweep points are
always independent) is made. A flag is raised when an ordering fails by more than `tol`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .metric_spec import MetricSpec
from .registry import attack_metrics


@dataclass(frozen=True)
class SanityReport:
    flags: dict[str, bool] = field(default_factory=dict)   # only the checks that could be made
    messages: list[str] = field(default_factory=list)      # one line per violated ordering

    @property
    def raised(self) -> list[str]:
        return [name for name, on in self.flags.items() if on]


def check_attack_order(acc: Mapping[str, float], tol: float,
                       specs: Sequence[MetricSpec] | None = None) -> SanityReport:
    """acc: attack name ('fgsm', 'pgd', ...) -> independent accuracy (fraction). The orderings are the
    attacks' declared `at_most` checks (default: every registered attack's); a flag is made when at
    least one of its pairs was measured."""
    specs = attack_metrics() if specs is None else list(specs)
    labels = {m.key: m.label for m in specs}
    flags: dict[str, bool] = {}
    messages: list[str] = []
    checks: dict[str, list[tuple[str, str, str]]] = {}   # flag -> (stronger, weaker, why), declaration order
    for m in specs:
        for rule in m.at_most:
            checks.setdefault(rule.flag, []).append((m.key, rule.weaker, rule.why))
    for flag, pairs in checks.items():
        made = [(k, w, why) for k, w, why in pairs if k in acc and w in acc]
        if not made:
            continue
        bad = [(k, w, why) for k, w, why in made if acc[k] > acc[w] + tol]
        flags[flag] = bool(bad)
        messages += [f"{labels[k]} accuracy {acc[k]:.4f} > {labels[w]} accuracy {acc[w]:.4f} "
                     f"(+{acc[k] - acc[w]:.4f}): {why}" for k, w, why in bad]
    return SanityReport(flags, messages)


def check_eps_curve(curve: Sequence[tuple[float, float]], tol: float) -> SanityReport:
    """curve: (eps, robust accuracy) points of one attack. Needs two or more eps values."""
    pts = sorted(curve)
    if len(pts) < 2:
        return SanityReport()
    messages = [f"robust accuracy rises from {a0:.4f} at eps={e0:g} to {a1:.4f} at eps={e1:g}"
                for (e0, a0), (e1, a1) in zip(pts, pts[1:], strict=False) if a1 > a0 + tol]
    (e_lo, a_lo), (e_hi, a_hi) = pts[0], pts[-1]
    if not messages and a_lo > tol and a_hi >= a_lo - tol:
        messages.append(f"robust accuracy does not fall from eps={e_lo:g} ({a_lo:.4f}) to eps={e_hi:g} ({a_hi:.4f})")
    return SanityReport({"eps_not_monotone": bool(messages)},
                        [m + ": larger budgets must not help the model" for m in messages])


def sanity_report(acc: Mapping[str, float], curve: Sequence[tuple[float, float]], *, tol: float,
                  compare_attacks: bool) -> SanityReport:
    parts = [check_attack_order(acc, tol)] if compare_attacks else []
    parts.append(check_eps_curve(curve, tol))
    flags: dict[str, bool] = {}
    messages: list[str] = []
    for part in parts:
        flags.update(part.flags)
        messages += part.messages
    return SanityReport(flags, messages)
