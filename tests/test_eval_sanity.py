"""Gradient-masking sanity flags on planted numbers (the end-to-end case is in test_eval_job.py)."""

from __future__ import annotations

from pipeline_lib.evaluation.sanity import check_attack_order, check_eps_curve, sanity_report

HONEST = {"fgsm": 0.60, "pgd": 0.50, "cw": 0.49, "autoattack": 0.47}


def test_an_honest_evaluation_raises_no_flag() -> None:
    report = sanity_report(HONEST, [(0.0, 0.9), (0.05, 0.7), (0.1, 0.5), (0.2, 0.1)], tol=0.005,
                           compare_attacks=True)
    assert report.flags == {"multistep_weaker_than_fgsm": False, "autoattack_weaker_than_pgd": False,
                            "eps_not_monotone": False}
    assert report.messages == [] and report.raised == []


def test_pgd_weaker_than_fgsm_is_flagged() -> None:
    report = check_attack_order({**HONEST, "pgd": 0.65}, tol=0.005)
    assert report.flags["multistep_weaker_than_fgsm"] and not report.flags["autoattack_weaker_than_pgd"]
    assert len(report.messages) == 1 and "PGD accuracy 0.6500 > FGSM accuracy 0.6000" in report.messages[0]


def test_autoattack_weaker_than_pgd_or_cw_is_flagged() -> None:
    report = check_attack_order({**HONEST, "autoattack": 0.495}, tol=0.001)
    assert report.flags == {"multistep_weaker_than_fgsm": False, "autoattack_weaker_than_pgd": True}
    assert [m.split(" (")[0] for m in report.messages] == ["AutoAttack accuracy 0.4950 > CW accuracy 0.4900"]


def test_the_tolerance_absorbs_small_gaps_only() -> None:
    close = {**HONEST, "pgd": 0.603}
    assert not check_attack_order(close, tol=0.005).flags["multistep_weaker_than_fgsm"]
    assert check_attack_order(close, tol=0.001).flags["multistep_weaker_than_fgsm"]


def test_flags_need_the_attacks_they_compare() -> None:
    assert check_attack_order({"pgd": 0.5}, tol=0.0).flags == {}
    assert check_attack_order({"fgsm": 0.5, "autoattack": 0.6}, tol=0.0).flags == {
        "multistep_weaker_than_fgsm": True}
    # a cascade's accuracies are cumulative: no attack-vs-attack flag is computed at all
    assert set(sanity_report({**HONEST, "pgd": 0.9}, [], tol=0.0, compare_attacks=False).flags) == set()


def test_accuracy_rising_with_eps_is_flagged() -> None:
    report = check_eps_curve([(0.0, 0.9), (0.05, 0.4), (0.1, 0.5), (0.2, 0.1)], tol=0.005)
    assert report.flags == {"eps_not_monotone": True}
    assert "rises from 0.4000 at eps=0.05 to 0.5000 at eps=0.1" in report.messages[0]


def test_accuracy_that_does_not_fall_across_the_sweep_is_flagged() -> None:
    # the classic masking signature: the attack gets nowhere, whatever the budget
    report = check_eps_curve([(0.05, 0.62), (0.1, 0.62), (0.3, 0.62)], tol=0.005)
    assert report.flags == {"eps_not_monotone": True} and "does not fall" in report.messages[0]


def test_a_curve_that_falls_or_sits_at_zero_is_fine() -> None:
    assert check_eps_curve([(0.0, 0.9), (0.1, 0.3), (0.05, 0.6)], tol=0.0).flags == {"eps_not_monotone": False}
    assert check_eps_curve([(0.0, 0.9), (0.1, 0.0), (0.2, 0.0)], tol=0.0).flags == {"eps_not_monotone": False}
    assert check_eps_curve([(0.1, 0.3)], tol=0.0).flags == {}     # one point: nothing to compare
