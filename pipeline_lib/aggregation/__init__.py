"""Aggregation: NRR, ARDist, the comparison table, the tradeoff plot and the regression gate.

Pure metric code (nrr, curve, ardist) imports nothing from the rest of the project;
`job.run_aggregate` (the stage's work) is imported by the stage command, not here,
because pipeline_lib.config imports this package for `AggregateParams`. For the same reason
the metric functions are loaded on first use (PEP 562): ardist and curve import SciPy's
integrate and stats (~1.3 s on a 2-core CPU), which every stage would otherwise pay for its params.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .config import AggregateParams, GateParams, GateRule
from .nrr import nrr   # eager (math only): a lazy `nrr` would be shadowed by its own submodule once imported

if TYPE_CHECKING:
    from .ardist import mean_gap, signed_distance
    from .curve import CurveFitError, TradeoffCurve, fit_tradeoff_curve

_LAZY = {"mean_gap": "ardist", "signed_distance": "ardist", "CurveFitError": "curve", "TradeoffCurve": "curve",
         "fit_tradeoff_curve": "curve"}

__all__ = ["AggregateParams", "CurveFitError", "GateParams", "GateRule", "TradeoffCurve", "fit_tradeoff_curve",
           "mean_gap", "nrr", "signed_distance"]

__getattr__ = lazy_exports(__name__, _LAZY)
