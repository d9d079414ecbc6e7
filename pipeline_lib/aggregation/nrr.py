"""Natural-Robust Ratio (CURE, Appendix F.2): the harmonic mean of clean and robust accuracy."""

from __future__ import annotations

import math


def nrr(natural: float, robust: float) -> float:
    """NRR = 2 * Nat * Rob / (Nat + Rob), in the unit of its inputs (the project uses percent).

    Like any harmonic mean it is dominated by the smaller of the two, so a model
    cannot buy a high NRR with clean accuracy alone. NRR(0, 0) is 0 (the limit).
    """
    for name, value in (("natural", natural), ("robust", robust)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"NRR needs finite non-negative accuracies, got {name}={value!r}")
    total = natural + robust
    return 0.0 if total == 0 else 2.0 * natural * robust / total
