"""The cascade: resume after a kill gives the uninterrupted record without rerunning finished work;
stale state is ignored; cascade mode only attacks what is still robust; the record CSV."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from eval_support import eval_params, fit, steps_for
from pipeline_lib.evaluation.cascade import run_cascade
from pipeline_lib.evaluation.record import EvalRecord, read_record_csv
from pipeline_lib.evaluation.registry import AttackStep
from pipeline_lib.evaluation.record_metrics import accuracies, worst_case_columns

EPS = 0.01   # the fitted tiny model keeps part of the batch at this eps: records are not all-broken



class Killed(BaseException):
    """A simulated SIGKILL: not an Exception, so nothing on the way catches it."""


class Instrumented:
    """The steps with their run functions counted per step; `kill_at=(step, call)` raises on that call."""

    def __init__(self, steps: list[AttackStep], kill_at: tuple[str, int] | None = None) -> None:
        self.calls = {st.name: 0 for st in steps}
        self.kill_at = kill_at
        self.steps = [AttackStep(st.name, st.metric, st.eps, self._wrap(st), st.worst_case) for st in steps]

    def _wrap(self, step: AttackStep):  # type: ignore[no-untyped-def]
        def run(x, y, gen):  # type: ignore[no-untyped-def]
            self.calls[step.name] += 1
            if self.kill_at == (step.name, self.calls[step.name]):
                raise Killed(f"killed in {step.name}, call {self.calls[step.name]}")
            return step.run(x, y, gen)
        return run


@pytest.fixture
def trained(tiny_model: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    return fit(tiny_model, *tiny_batch).requires_grad_(False)


def _params():  # type: ignore[no-untyped-def]
    return eval_params(attacks=["fgsm", "pgd", "cw"], batch_size=8, eps_sweep=[0.02])


def _run(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], inst: Instrumented, state: Path | None,
         fingerprint: str = "fp", cascade: bool = False) -> EvalRecord:
    x, y = batch
    return run_cascade(model, x, y, inst.steps, batch_size=8, seed=0, cascade=cascade, state_path=state,
                       fingerprint=fingerprint, progress=False)


def _same(a: EvalRecord, b: EvalRecord) -> None:
    assert a.steps == b.steps
    for name in ("labels", "clean_pred", "broken", "attempted", "done"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("kill_at", [("cw", 1), ("cw", 3)], ids=["after-2nd-attack", "inside-3rd-attack"])
def test_resume_after_a_kill_gives_the_uninterrupted_record_and_skips_finished_work(
        trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor], tmp_path: Path,
        kill_at: tuple[str, int]) -> None:
    steps = steps_for(trained, _params(), EPS)          # fgsm, pgd, cw, pgd_eps_0.02; 32 examples = 4 batches
    full = _run(trained, tiny_batch, Instrumented(steps), None)
    assert 0 < int(full.broken.sum()) < full.broken.numel(), "a record worth comparing: some broken, some not"

    state = tmp_path / "state.pt"
    first = Instrumented(steps, kill_at=kill_at)
    with pytest.raises(Killed):
        _run(trained, tiny_batch, first, state)
    assert state.exists()
    second = Instrumented(steps)
    resumed = _run(trained, tiny_batch, second, state)
    _same(resumed, full)

    batches = 4   # every example is clean-correct: each step attacks all 32, 8 at a time
    finished_cw_batches = kill_at[1] - 1
    assert second.calls == {"fgsm": 0, "pgd": 0, "cw": batches - finished_cw_batches, "pgd_eps_0.02": batches}
    assert first.calls["fgsm"] == first.calls["pgd"] == batches


def test_a_state_from_another_configuration_is_ignored(trained: nn.Module,
                                                       tiny_batch: tuple[torch.Tensor, torch.Tensor],
                                                       tmp_path: Path) -> None:
    steps = steps_for(trained, _params(), EPS)
    state = tmp_path / "state.pt"
    with pytest.raises(Killed):
        _run(trained, tiny_batch, Instrumented(steps, kill_at=("cw", 1)), state, fingerprint="old")
    fresh = Instrumented(steps)
    with pytest.warns(RuntimeWarning, match="different evaluation"):
        _run(trained, tiny_batch, fresh, state, fingerprint="new")
    assert fresh.calls["fgsm"] == 4 and fresh.calls["pgd"] == 4, "stale state must not be reused"


def test_an_unreadable_state_is_moved_aside_and_the_evaluation_starts_afresh(
        trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    steps = steps_for(trained, _params(), EPS)
    state = tmp_path / "state.pt"
    with pytest.raises(Killed):
        _run(trained, tiny_batch, Instrumented(steps, kill_at=("cw", 2)), state)
    state.write_bytes(state.read_bytes()[:-40])              # truncated: the zip directory at its end is gone
    fresh = Instrumented(steps)
    with caplog.at_level("WARNING"):
        record = _run(trained, tiny_batch, fresh, state)
    _same(record, _run(trained, tiny_batch, Instrumented(steps), None))
    assert fresh.calls["fgsm"] == 4, "nothing can be reused from an unreadable state"
    assert (tmp_path / "state.pt.corrupt").exists() and EvalRecord.load_state(state, "fp", record.steps)
    assert any(str(state) in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)


def test_cascade_mode_attacks_only_what_earlier_attacks_left_robust(
        trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    steps = steps_for(trained, _params(), EPS)
    rec = _run(trained, tiny_batch, Instrumented(steps), None, cascade=True)
    fgsm, pgd, cw, sweep = (rec.column(n) for n in ("fgsm", "pgd", "cw", "pgd_eps_0.02"))
    assert torch.equal(rec.attempted[:, pgd], rec.clean_correct & ~rec.broken[:, fgsm])
    assert torch.equal(rec.attempted[:, cw], rec.clean_correct & ~rec.broken[:, [fgsm, pgd]].any(1))
    assert torch.equal(rec.attempted[:, sweep], rec.clean_correct), "the sweep is never cascaded"
    acc = accuracies(rec, steps, cascade=True)     # cumulative: robust to every attack so far
    assert acc["fgsm_acc"] == rec.accuracy([fgsm]) and acc["pgd_acc"] == rec.accuracy([fgsm, pgd])
    assert acc["fgsm_acc"] >= acc["pgd_acc"] >= acc["cw_acc"] == acc["worst_case_acc"]


def test_independent_mode_attacks_every_clean_correct_example(
        trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = tiny_batch
    y = y.clone()
    y[:3] = (y[:3] + 1) % 10          # three examples the model gets wrong on clean images
    steps = steps_for(trained, _params(), EPS)
    rec = _run(trained, (x, y), Instrumented(steps), None)
    assert int(rec.clean_correct.sum()) == len(y) - 3
    for s in range(len(steps)):
        assert torch.equal(rec.attempted[:, s], rec.clean_correct), steps[s].name
    acc = accuracies(rec, steps)
    assert acc["worst_case_acc"] == rec.accuracy(worst_case_columns(steps))
    assert acc["worst_case_acc"] <= min(acc["fgsm_acc"], acc["pgd_acc"], acc["cw_acc"])


def test_the_record_csv_says_which_attack_broke_which_image(
        trained: nn.Module, tiny_batch: tuple[torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    steps = steps_for(trained, _params(), EPS)
    rec = _run(trained, tiny_batch, Instrumented(steps), None, cascade=True)
    rec.write_csv(tmp_path / "record.csv", worst_case_columns(steps))
    cols = read_record_csv(tmp_path / "record.csv")
    assert list(cols) == ["index", "label", "clean_pred", "clean_correct", "fgsm", "pgd", "cw", "pgd_eps_0.02",
                          "robust"]
    assert cols["index"] == [str(i) for i in range(32)]
    for name in ("fgsm", "pgd", "cw"):
        s = rec.column(name)
        expected = [("1" if b else "0") if a else "" for a, b in zip(rec.attempted[:, s].tolist(),
                                                                     rec.broken[:, s].tolist(), strict=True)]
        assert cols[name] == expected
    assert "" in cols["cw"], "in a cascade, examples already broken are not attacked again (blank)"
    robust = rec.robust(worst_case_columns(steps))
    assert cols["robust"] == [str(int(r)) for r in robust.tolist()]
