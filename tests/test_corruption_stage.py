"""The generated path end to end (corrupt + corruption@model on tiny Fashion-MNIST files), the
params section, the relative error against the standard model, and the CLI's error exits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import base_params_dict, tiny_params, write_fashion_mnist
from typer.testing import CliRunner

from pipeline_lib import checkpoint
from pipeline_lib.config import ParamsError, parse_params
from pipeline_lib.corruption.accuracy_grid import summarise
from pipeline_lib.corruption.config import EXTRA, SEVERITIES, STANDARD
from pipeline_lib.corruption.generate import corrupt
from pipeline_lib.corruption.mce import relative_corruption_error, relative_to_reference
from pipeline_lib.corruption.store import CorruptedSet, CorruptedSetError, read_manifest
from pipeline_lib.data import load_test
from pipeline_lib.io import read_json
from stages.cli import app
from stages.corruption import build_set, score

SMALL = {"n_images": 12, "corruptions": ["gaussian_noise", "contrast", "fog"], "extra": ["saturate", "spatter"]}


@pytest.fixture
def fm_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_fashion_mnist(root, n_train=64, n_test=32)
    return root


def test_generated_set_layout_manifest_and_samples(tmp_path: Path, fm_root: Path) -> None:
    p = tiny_params(fm_root, corruption=SMALL)
    out = tmp_path / "corrupted"
    out.mkdir()
    np.save(out / "frost.npy", np.zeros(3, np.uint8))   # left over from a run with other params
    manifest = build_set(p, out, tmp_path / "samples.png")
    m = read_manifest(out)
    assert {k: v for k, v in manifest.items() if k != "build_time_s"} == {k: v for k, v in m.items() if k != "format"}
    assert m["source"] == "generated" and m["dataset"] == "fashion_mnist" and m["n_images"] == 12
    assert m["corruptions"] == SMALL["corruptions"] and m["extra"] == ["spatter"]
    assert "saturation 0" in m["skipped"]["saturate"]
    assert sorted(f.name for f in out.glob("*.npy")) == ["contrast.npy", "fog.npy", "gaussian_noise.npy",
                                                         "labels.npy", "spatter.npy"]
    x, y = load_test("fashion_mnist", fm_root, 12)
    clean = x.permute(0, 2, 3, 1).numpy()
    cs = CorruptedSet(out)
    for name in ["gaussian_noise", "fog"]:
        for s in SEVERITIES:   # what the stage wrote is what `corrupt` makes for these test images
            images, labels = cs.load(name, s)
            np.testing.assert_array_equal(images, corrupt(clean, name, s, seed=p.corruption.seed))
            np.testing.assert_array_equal(labels, y.numpy())
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluation_metrics_heatmap_and_guards(tmp_path: Path, fm_root: Path, tiny_model) -> None:
    p = tiny_params(fm_root, corruption=SMALL)
    out = tmp_path / "corrupted"
    build_set(p, out, tmp_path / "samples.png")
    checkpoint.save_model(tmp_path / "m.pt", tiny_model, arch="small_cnn", dataset="fashion_mnist", meta={})
    metrics = score(p, "m", tmp_path / "m.pt", out, tmp_path / "m.json", tmp_path / "heat.png")
    assert read_json(tmp_path / "m.json") == metrics
    table = np.array([[metrics["table"][c][str(s)] for s in SEVERITIES] for c in SMALL["corruptions"]])
    assert metrics["mean_corruption_acc"] == pytest.approx(table.mean())
    assert metrics["per_severity"]["5"] == pytest.approx(table[:, 4].mean())
    assert metrics["mean_extra_acc"] == pytest.approx(np.mean(list(metrics["extra_table"]["spatter"].values())))
    assert set(metrics["per_corruption"]) == set(SMALL["corruptions"]) and metrics["n_eval"] == 12
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"
    # a set made from other test images is refused, not silently scored
    labels = np.load(out / "labels.npy")
    np.save(out / "labels.npy", (labels + 1) % 10)
    with pytest.raises(CorruptedSetError, match="differ from the first 12 test labels"):
        score(p, "m", tmp_path / "m.pt", out, tmp_path / "m2.json", tmp_path / "h2.png")


def test_corruption_stages_apply_runtime_like_the_others(tmp_path: Path, fm_root: Path, tiny_model) -> None:
    """corrupt and corruption@ start up through run_setup.start_run as training and evaluation do:
    runtime.num_threads is applied (the corruption stage used to ignore it)."""
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    p = tiny_params(fm_root, corruption=SMALL, runtime={"num_threads": want})
    out = tmp_path / "corrupted"
    checkpoint.save_model(tmp_path / "m.pt", tiny_model, arch="small_cnn", dataset="fashion_mnist", meta={})
    try:
        build_set(p, out, tmp_path / "samples.png")
        assert torch.get_num_threads() == want
        torch.set_num_threads(before)
        score(p, "m", tmp_path / "m.pt", out, tmp_path / "m.json", tmp_path / "heat.png")
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


def test_summary_keeps_extra_corruptions_out_of_the_mean() -> None:
    table = {"fog": [1.0, 0.8, 0.6, 0.4, 0.2], "contrast": [0.5] * 5, "spatter": [0.0] * 5}
    s = summarise(table, ["fog", "contrast"], ["spatter"], clean_acc=0.9)
    assert s["mean_corruption_acc"] == pytest.approx(0.55)
    assert s["mean_corruption_error"] == pytest.approx(0.45)
    assert s["per_severity"] == pytest.approx({"1": 0.75, "2": 0.65, "3": 0.55, "4": 0.45, "5": 0.35})
    assert s["mean_extra_acc"] == 0.0 and "spatter" not in s["table"]


def _metrics(errors: dict[str, list[float]]) -> dict:
    table = {c: [1 - e for e in errs] for c, errs in errors.items()}
    return summarise(table, list(table), [], clean_acc=0.9)


def test_relative_error_against_the_standard_model() -> None:
    std = _metrics({"fog": [0.2, 0.2, 0.4, 0.4, 0.8], "contrast": [0.1] * 5, "snow": [0.0] * 5})
    half = _metrics({"fog": [0.1, 0.1, 0.2, 0.2, 0.4], "contrast": [0.2] * 5, "snow": [0.3] * 5})
    rel = relative_to_reference({"standard": std, "half": half})
    assert rel["standard"]["mce_vs_standard"] == pytest.approx(1.0)
    assert rel["half"]["ce_vs_standard"] == pytest.approx({"fog": 0.5, "contrast": 2.0, "snow": None})
    assert rel["half"]["mce_vs_standard"] == pytest.approx(1.25)   # snow: standard never errs, no CE
    assert rel["half"]["error_ratio"] == pytest.approx(half["mean_corruption_error"] / std["mean_corruption_error"])
    with pytest.raises(KeyError, match="reference model 'standard'"):
        relative_to_reference({"half": half})
    with pytest.raises(ValueError, match="share no corruption"):
        relative_corruption_error(_metrics({"fog": [0.1] * 5}), _metrics({"snow": [0.1] * 5}))


@pytest.mark.parametrize(("section", "message"), [
    ({"corruptions": ["rain"]}, "unknown corruption"),
    ({"corruptions": ["fog", "fog"]}, "duplicate"),
    ({"extra": ["fog"]}, "listed in both"),
    ({"corruptions": []}, "corruption.corruptions"),
    ({"n_images": 0}, "corruption.n_images"),
    ({"source": "zenodo"}, "corruption.source"),
    ({"severity": 3}, "unknown key"),
])
def test_params_section_rejects_bad_values(section: dict, message: str) -> None:
    raw = base_params_dict()
    raw["corruption"] = {**raw["corruption"], **section}
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)


def test_default_params_run_every_corruption() -> None:
    c = parse_params(base_params_dict()).corruption
    assert c.corruptions == list(STANDARD) and c.extra == list(EXTRA) and c.source == "generated"


def test_cli_exits_2_with_the_reason(tmp_path: Path, fm_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    raw = base_params_dict("ci")
    raw["data"]["root"] = str(fm_root)
    raw["runtime"]["progress"] = False
    raw["corruption"] = {**raw["corruption"], "source": "released"}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["corrupt", "--out", str(tmp_path / "c"), "--samples",
                                      str(tmp_path / "s.png"), "--params", str(params)])
    assert result.exit_code == 2
    assert "no released corrupted set for dataset 'fashion_mnist'" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["corruption", "standard", "--model", str(tmp_path / "m.pt"), "--data",
                                      str(tmp_path / "c"), "--metrics", str(tmp_path / "m.json"), "--heatmap",
                                      str(tmp_path / "h.png"), "--params", str(params)])
    assert result.exit_code == 2 and "run the `corrupt` stage first" in " ".join(result.output.split())


def test_only_the_corruption_stages_read_corruption_params() -> None:
    """A corruption param change must not re-run training or attack evaluation; the evaluation
    of a model must not re-run when only generation params change (the set's hash covers them)."""
    import yaml

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]
    readers = {name for name, st in stages.items() for key in st.get("params", []) if str(key).startswith("corruption")}
    assert readers == {"corrupt", "corruption", "corruption_rep"}   # corruption_rep: the same per extra seed
    assert all(str(k).startswith(("data.dataset", "corruption.")) for k in stages["corrupt"]["params"])
    for name in ("corruption", "corruption_rep"):
        assert set(stages[name]["params"]) == {"data.dataset", "corruption.batch_size"}
        assert "data/corrupted/${data.dataset}" in stages[name]["deps"]
