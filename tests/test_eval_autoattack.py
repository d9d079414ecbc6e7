"""AutoAttack through the project equals a direct pyautoattack run, example for example."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from pyautoattack import AutoAttack
from torch import nn

from eval_support import eval_params, fit, steps_for
from pipeline_lib.evaluation.autoattack import AA_LOGGER, build_autoattack, capture_logs
from pipeline_lib.evaluation.cascade import run_cascade
from pipeline_lib.evaluation.config import AutoAttackParams
from pipeline_lib.evaluation.record import EvalRecord
from pipeline_lib.evaluation.registry import AttackStep
from pipeline_lib.evaluation.record_metrics import accuracies, autoattack_progress, metric_columns

EPS = 0.01        # the fitted tiny model keeps about half the batch under AutoAttack here
BATCH = 16        # 32 examples: AutoAttack works in two batches, so batching must match too
COMPONENTS = ["apgd-ce", "apgd-t"]



class Killed(BaseException):
    pass


@pytest.fixture
def trained(tiny_model: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    return fit(tiny_model, *tiny_batch).requires_grad_(False)


def _direct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pyautoattack used as its README says (a custom attack list, settings set on the sub-attacks):
    (robust flags (N,), adversarial images (N, C, H, W))."""
    adversary = AutoAttack(model, attacks=COMPONENTS, version="custom", norm="Linf", eps=EPS, seed=0)
    adversary.apgd.n_restarts = 1                       # the standard version's value
    adversary.apgd_targeted.n_target_classes = 1
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=BATCH)
    return y_adv == y, x_adv


def _project(model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: Path | None = None,
             kill_at: str | None = None, adversarial: dict[int, torch.Tensor] | None = None,
             ) -> tuple[EvalRecord, list[AttackStep]]:
    """The project's evaluation (FGSM, then AutoAttack). `kill_at`: that step dies on its second
    batch, after finishing the first. `adversarial` collects index -> the adversarial image of
    every example an AutoAttack component broke."""
    e = eval_params(attacks=["fgsm", "autoattack"], batch_size=BATCH,
                    autoattack={"version": "custom", "custom": {"attacks": COMPONENTS, "target_classes": 1}})
    steps = _watched(steps_for(model, e, EPS), model, x, kill_at, adversarial)
    return run_cascade(model, x, y, steps, batch_size=BATCH, seed=0, state_path=state, fingerprint="fp",
                       progress=False), steps


def _watched(steps: list[AttackStep], model: nn.Module, x: torch.Tensor, kill_at: str | None = None,
             adversarial: dict[int, torch.Tensor] | None = None) -> list[AttackStep]:
    """The steps, each run recording into `adversarial` (index -> image) what an AutoAttack component broke;
    `kill_at`: that step dies on its second batch."""
    calls: list[str] = []

    def watched(step: AttackStep):  # type: ignore[no-untyped-def]
        def run(xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            calls.append(step.name)
            if step.name == kill_at and calls.count(step.name) == 2:
                raise Killed(kill_at)
            x_adv = step.run(xb, yb, gen)
            if adversarial is not None and step.metric == "autoattack_acc":
                broken = model(x_adv).argmax(1) != yb
                for row in broken.nonzero().flatten().tolist():
                    index = int((x == xb[row]).flatten(1).all(1).nonzero())   # rows of x are distinct
                    adversarial[index] = x_adv[row]
            return x_adv
        return run

    return [AttackStep(st.name, st.metric, st.eps, watched(st), st.worst_case) for st in steps]


def test_project_autoattack_equals_a_direct_pyautoattack_run(
        trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    x, y = tiny_batch
    direct, direct_adv = _direct(trained, x, y)
    assert 0 < int(direct.sum()) < len(y), "the comparison needs both robust and broken examples"

    # The project's run is killed inside APGD-T (its 2nd batch) and resumed from the saved
    # state, so the comparison covers the resumed path as well as the uninterrupted one before it.
    state, adversarial = tmp_path / "state.pt", {}
    with pytest.raises(Killed):
        _project(trained, x, y, state, kill_at="autoattack/apgd-t", adversarial=adversarial)
    record, steps = _project(trained, x, y, state, adversarial=adversarial)
    ours = record.robust(metric_columns(steps)["autoattack_acc"])
    assert torch.equal(ours, direct)
    # the same adversarial images, bit for bit: same batches, same seeds, same random starts
    assert sorted(adversarial) == (~direct).nonzero().flatten().tolist()
    for index, image in adversarial.items():
        assert torch.equal(image, direct_adv[index]), index
    assert accuracies(record, steps)["autoattack_acc"] == float(direct.float().mean())
    # FGSM ran first, yet AutoAttack attacked every clean-correct example (independent accuracies)
    assert torch.equal(record.attempted[:, record.column("autoattack/apgd-ce")], record.clean_correct)
    progress = autoattack_progress(record, steps)
    assert list(progress) == COMPONENTS and progress["apgd-ce"] >= progress["apgd-t"] == float(direct.float().mean())


def test_autoattack_log_goes_to_the_file_not_the_console(
        trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    x, y = tiny_batch[0][:BATCH], tiny_batch[1][:BATCH]
    aa_logger = logging.getLogger(AA_LOGGER)
    before = (aa_logger.level, aa_logger.propagate, list(aa_logger.handlers))
    with caplog.at_level(logging.INFO), capture_logs(tmp_path / "eval.log") as path:
        _project(trained, x, y)
    text = path.read_text()
    assert "running apgd-ce" in text and "running apgd-t" in text          # AutoAttack's own DEBUG lines
    assert "autoattack/apgd-t broke" in text                               # the cascade's summary lines
    assert not any(r.name == AA_LOGGER for r in caplog.records), "AutoAttack's batch lines stay off the console"
    assert any("autoattack/apgd-t broke" in r.getMessage() for r in caplog.records)
    assert (aa_logger.level, aa_logger.propagate, list(aa_logger.handlers)) == before


def test_custom_starts_from_the_standard_settings(trained: nn.Module) -> None:
    standard = AutoAttack(trained, version="standard", eps=EPS, seed=0)
    plain_custom = AutoAttack(trained, attacks=["apgd-ce"], version="custom", eps=EPS, seed=0)
    ours = build_autoattack(trained, AutoAttackParams.model_validate(
        {"version": "custom", "custom": {"attacks": ["apgd-ce", "square"]}}), eps=EPS, seed=0, device="cpu")
    assert ours.attacks_to_run == ["apgd-ce", "square"]
    assert ours.apgd.n_restarts == standard.apgd.n_restarts != plain_custom.apgd.n_restarts
    assert ours.square.n_queries == standard.square.n_queries
    assert ours.apgd_targeted.n_target_classes == standard.apgd_targeted.n_target_classes
    built = build_autoattack(trained, AutoAttackParams(), eps=EPS, seed=0, device="cpu")
    assert built.attacks_to_run == standard.attacks_to_run and built.seed == 0 and built.epsilon == EPS


def test_autoattack_params_are_validated() -> None:
    with pytest.raises(ValueError, match="needs `custom"):
        AutoAttackParams.model_validate({"version": "custom"})
    with pytest.raises(ValueError, match="literal_error|Input should be"):
        AutoAttackParams.model_validate({"version": "custom", "custom": {"attacks": ["pgd"]}})
    with pytest.raises(ValueError, match="duplicates"):
        AutoAttackParams.model_validate({"version": "custom", "custom": {"attacks": ["apgd-ce", "apgd-ce"]}})
    # a profile switches to the standard version with one key; the custom block is then unused
    assert AutoAttackParams.model_validate({"version": "standard", "custom": {"attacks": ["apgd-ce"]}})


# eps at which the fitted tiny model loses some but not all of the batch to each component alone
COMPONENT_EPS = {"apgd-ce": EPS, "apgd-dlr": EPS, "apgd-t": EPS, "fab": EPS, "fab-t": EPS, "square": 0.06}


@pytest.mark.parametrize("component", sorted(COMPONENT_EPS))
def test_each_component_equals_a_direct_run_and_checks_the_model_once(
        component: str, trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """How run_component sets and seeds each component's attack object, against run_standard_evaluation's
    own loop (same images, bit for bit); pyautoattack's model checks once per AutoAttack object."""
    from pyautoattack import checks

    x, y = tiny_batch
    eps = COMPONENT_EPS[component]
    params = AutoAttackParams.model_validate({"version": "custom", "custom": {
        "attacks": [component], "target_classes": 2, "square_queries": 300, "apgd_iterations": 10}})
    direct_adv, y_adv = build_autoattack(trained, params, eps=eps, seed=0, device="cpu").run_standard_evaluation(
        x, y, batch_size=BATCH)

    calls: list[str] = []
    for name in ("check_randomized", "check_dynamic"):
        original = getattr(checks, name)
        monkeypatch.setattr(checks, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    adversarial: dict[int, torch.Tensor] = {}
    e = eval_params(batch_size=BATCH, attacks=["autoattack"], autoattack=params.model_dump())
    steps = _watched(steps_for(trained, e, eps), trained, x, adversarial=adversarial)
    record = run_cascade(trained, x, y, steps, batch_size=BATCH, seed=0, progress=False)
    assert calls == ["check_randomized", "check_dynamic"], "two batches, yet pyautoattack's checks run once"
    assert 0 < int(record.broken.sum()) < int(record.clean_correct.sum()), "the comparison needs both outcomes"
    assert torch.equal(record.robust([0]), y_adv == y)
    assert sorted(adversarial) == (record.clean_correct & (y_adv != y)).nonzero().flatten().tolist()
    for index, image in adversarial.items():
        assert torch.equal(image, direct_adv[index]), index
