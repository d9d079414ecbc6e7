"""The reference Pareto frontier: references on or below it, hand-checked distances, ARDist's bootstrap,
and per-example correctness rebuilt from an evaluation record exactly as the evaluate stage counts it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.aggregation.ardist import ardist_bootstrap, mean_gap, signed_distance
from pipeline_lib.aggregation.curve import CurveFitError, fit_tradeoff_curve
from pipeline_lib.aggregation.frontier import fit_frontier, pareto_frontier
from pipeline_lib.aggregation.metrics_io import MetricsError
from pipeline_lib.aggregation.records import correctness_from_csv, load_correctness
from pipeline_lib.evaluation.record import EvalRecord
from pipeline_lib.evaluation.registry import AttackStep
from pipeline_lib.evaluation.record_metrics import accuracies
from pipeline_lib.stats import bootstrap_indices

# standard, pgd_at, trades, mart as (clean, robust): mart (74, 50) is dominated by pgd_at (78, 54).
REFS = {"standard": (90.0, 0.0), "pgd_at": (78.0, 54.0), "trades": (70.0, 58.0), "mart": (74.0, 50.0)}


def test_frontier_drops_dominated_points_and_ties() -> None:
    xs, ys = zip(*REFS.values(), strict=True)
    assert pareto_frontier(list(xs), list(ys)) == [(70.0, 58.0), (78.0, 54.0), (90.0, 0.0)]
    # equal clean accuracy: the more robust one; equal robust accuracy: the cleaner one
    assert pareto_frontier([80, 80, 85], [40, 45, 45]) == [(85.0, 45.0)]


def test_every_reference_is_on_or_below_and_frontier_references_score_zero() -> None:
    xs, ys = zip(*REFS.values(), strict=True)
    curve = fit_frontier(xs, ys)
    d = {m: signed_distance(curve, *p) for m, p in REFS.items()}
    assert all(v <= 0 for v in d.values())
    assert d["standard"] == d["pgd_at"] == d["trades"] == 0.0
    # mart: nearest boundary point is on the segment (70, 58)-(78, 54) or the one down to (90, 0)
    seg = [((70, 58), (78, 54)), ((78, 54), (90, 0))]

    def to_segment(p, a, b):
        a, b, p = np.array(a, float), np.array(b, float), np.array(p, float)
        t = np.clip((p - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
        return float(np.linalg.norm(a + t * (b - a) - p))
    assert d["mart"] == pytest.approx(-min(to_segment((74, 50), a, b) for a, b in seg), abs=1e-9)
    assert d["mart"] < -1.0


def test_distances_beyond_and_outside_the_frontier_range() -> None:
    curve = fit_frontier([70.0, 78.0, 90.0], [58.0, 54.0, 0.0])
    # on the segment (70, 58)-(78, 54) at x = 74: y = 56; 2 points above -> 2 / sqrt(1 + 0.5^2) (slope -1/2)
    assert signed_distance(curve, 74.0, 58.0) == pytest.approx(2 / math.sqrt(1.25), abs=1e-9)
    # left of the frontier the boundary is flat at 58: 3 points above it -> +3, 3 below -> -3
    assert signed_distance(curve, 60.0, 61.0) == pytest.approx(3.0)
    assert signed_distance(curve, 60.0, 55.0) == pytest.approx(-3.0)
    # right of it the boundary drops vertically at 90: a cleaner model is beyond, by its horizontal distance
    assert signed_distance(curve, 92.0, -0.0) == pytest.approx(2.0)
    assert signed_distance(curve, 92.0, -5.0) == pytest.approx(2.0)
    assert math.isnan(float(curve(95.0))) and float(curve(50.0)) == 58.0


def test_one_reference_is_enough_and_none_is_an_error() -> None:
    curve = fit_frontier([80.0], [40.0])
    assert signed_distance(curve, 80.0, 40.0) == 0.0
    assert signed_distance(curve, 75.0, 35.0) == pytest.approx(-5.0)    # dominated: 5 below and 5 left
    assert signed_distance(curve, 83.0, 44.0) == pytest.approx(5.0)     # beyond the corner by (3, 4)
    with pytest.raises(CurveFitError, match="at least one"):
        fit_frontier([], [])


def test_sweep_mean_gap_against_the_frontier() -> None:
    curve = fit_frontier([70.0, 78.0, 90.0], [58.0, 54.0, 0.0])
    sweep = fit_tradeoff_curve([70.0, 78.0], [60.0, 56.0])     # 2 points above the first segment everywhere
    assert mean_gap(sweep, curve) == pytest.approx(2.0, abs=1e-6)


def test_ardist_bootstrap_refits_the_frontier_and_keeps_references_at_or_below_zero() -> None:
    rng = np.random.default_rng(0)
    n = 400
    correct = {m: (rng.random(n) < c / 100, rng.random(n) < r / 100) for m, (c, r) in REFS.items()}
    correct["method"] = (rng.random(n) < 0.80, rng.random(n) < 0.56)
    idx = bootstrap_indices(n, 300)
    ci = ardist_bootstrap(correct, list(REFS), None, idx)
    assert all(ci[m][1] <= 1e-9 for m in REFS)                    # a reference is never beyond its own frontier
    assert ci["method"][0] < ci["method"][1]
    assert ardist_bootstrap(correct, list(REFS), None, idx) == ci  # same indices, same interval
    fixed = fit_frontier([70.0], [40.0])                           # published: only the model moves
    lo, hi = ardist_bootstrap({"method": correct["method"]}, None, fixed, idx)["method"]
    assert lo > 0


def _record(path: Path, cascade: bool) -> tuple[EvalRecord, list[AttackStep]]:
    g = torch.Generator().manual_seed(3)
    n = 60
    steps = [AttackStep("fgsm", "fgsm_acc", 0.1, None), AttackStep("pgd", "pgd_acc", 0.1, None),  # type: ignore[arg-type]
             AttackStep("autoattack/apgd-ce", "autoattack_acc", 0.1, None),                       # type: ignore[arg-type]
             AttackStep("autoattack/apgd-t", "autoattack_acc", 0.1, None),                        # type: ignore[arg-type]
             AttackStep("pgd_eps_0.2", "pgd_acc_eps_0.2", 0.2, None, worst_case=False)]           # type: ignore[arg-type]
    labels = torch.randint(0, 3, (n,), generator=g)
    pred = torch.where(torch.rand(n, generator=g) < 0.8, labels, (labels + 1) % 3)
    rec = EvalRecord.new([s.name for s in steps], labels, pred, 0.0)
    rec.broken = torch.rand(n, len(steps), generator=g) < 0.25
    rec.attempted = torch.ones_like(rec.broken)
    if cascade:   # a cascade attacks only what earlier worst-case steps left robust
        for j in range(1, 4):
            survived = rec.robust(list(range(j)))
            rec.attempted[:, j] = survived
            rec.broken[:, j] &= survived
    rec.write_csv(path, [0, 1, 2, 3])
    return rec, steps


@pytest.mark.parametrize("cascade", [False, True])
def test_record_correctness_reproduces_the_evaluate_stage_accuracies(tmp_path: Path, cascade: bool) -> None:
    rec, steps = _record(tmp_path / "m_record.csv", cascade)
    acc = accuracies(rec, steps, cascade)
    c = correctness_from_csv(tmp_path / "m_record.csv", cascade)
    for key, value in acc.items():
        col = key.removesuffix("_acc")
        if col in c:
            assert c[col].mean() == pytest.approx(value), key
    assert set(c) == {"clean", "fgsm", "pgd", "autoattack", "worst_case"}
    assert np.array_equal(c["clean"], rec.clean_correct.numpy())


def test_a_record_from_another_run_is_refused(tmp_path: Path) -> None:
    rec, steps = _record(tmp_path / "m_record.csv", False)
    acc = {k.removesuffix("_acc"): 100 * v for k, v in accuracies(rec, steps).items()}
    assert set(load_correctness(["m", "absent"], tmp_path, {"m": acc})) == {"m"}
    with pytest.raises(MetricsError, match="another run"):
        load_correctness(["m"], tmp_path, {"m": {**acc, "clean": acc["clean"] + 5}})
