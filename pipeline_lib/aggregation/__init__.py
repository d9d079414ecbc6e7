"""Aggregation: NRR, ARDist, the comparison table, the tradeoff plot and the regression gate.

Pure metric code (nrr, curve, ardist) imports nothing from the rest of the project;
`job.run_aggregate` (the stage's work) is imported by the stage command, not here,
because pipeline_lib.config imports this package for `AggregateParams`.
"""

from .ardist import mean_gap, signed_distance
from .config import AggregateParams, GateParams, GateRule
from .curve import CurveFitError, TradeoffCurve, fit_tradeoff_curve
from .nrr import nrr

__all__ = ["AggregateParams", "CurveFitError", "GateParams", "GateRule", "TradeoffCurve", "fit_tradeoff_curve",
           "mean_gap", "nrr", "signed_distance"]
