"""Checkpoints and atomic writes: self-describing, crash-safe, loaded with weights_only=True."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline_lib import checkpoint
from pipeline_lib.io import atomic_path, atomic_write, read_json, write_json


class Payload:
    """An arbitrary class: unpickling it would run code, so weights_only loading must refuse it."""


def test_model_checkpoint_is_self_describing(tmp_path: Path, tiny_model: nn.Module) -> None:
    path = tmp_path / "m.pt"
    meta = {"method": "pgd_at", "config": {"optim": {"lr": 0.1, "milestones": [1, 2]}}, "epoch": 2}
    checkpoint.save_model(path, tiny_model, arch="small_cnn", dataset="fashion_mnist", meta=meta)
    raw = torch.load(path, weights_only=True)       # plain tensors and primitives only
    assert set(raw) == {"format", "arch", "dataset", "state_dict", "meta"}
    assert raw["meta"] == meta
    model, got = checkpoint.load_model(path)       # no other file or argument needed
    assert got == {"arch": "small_cnn", "dataset": "fashion_mnist", **meta}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in tiny_model.state_dict().items())


def test_weights_only_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.MODEL_FORMAT, "payload": Payload()}, path)
    for load in (checkpoint.load, checkpoint.load_model):
        with pytest.raises(checkpoint.CheckpointError, match=r"evil\.pt was refused by weights-only.*Payload"):
            load(path)


def test_foreign_and_missing_checkpoints_are_named(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=r"other\.pt is not an arpipe model checkpoint"):
        checkpoint.load_model(other)
    with pytest.raises(checkpoint.CheckpointError, match=r"missing\.pt does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_an_interrupted_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out" / "state.pt"
    checkpoint.save(path, {"epoch": 1})

    def killed(fh: object) -> None:
        torch.save({"epoch": 2, "big": torch.zeros(1000)}, fh)  # type: ignore[arg-type]
        raise KeyboardInterrupt   # the process dies after some bytes were written

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, killed)
    assert checkpoint.load(path) == {"epoch": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]   # no temporary left behind


def test_atomic_path_installs_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists() and tmp.parent == target.parent
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["b.txt"]


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """mkstemp makes 0600 files; outputs must be as readable as any file the user creates."""
    plain = tmp_path / "plain"
    plain.write_text("x")
    write_json(tmp_path / "m.json", {"a": 1})
    checkpoint.save(tmp_path / "c.pt", {"a": 1})
    expected = stat.S_IMODE(os.stat(plain).st_mode)
    assert stat.S_IMODE(os.stat(tmp_path / "m.json").st_mode) == expected
    assert stat.S_IMODE(os.stat(tmp_path / "c.pt").st_mode) == expected


def test_write_json_is_stable_and_strict(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, "x"]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1.5,\n    "x"\n  ],\n  "b": 1\n}\n'
    assert read_json(tmp_path / "a.json") == {"a": [1.5, "x"], "b": 1}
    with pytest.raises(ValueError):
        write_json(tmp_path / "nan.json", {"acc": float("nan")})     # NaN is not JSON: fail loudly
    assert not (tmp_path / "nan.json").exists()


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "blob"
    data = os.urandom(3 << 20)   # several read chunks
    path.write_bytes(data)
    assert checkpoint.file_sha256(path) == hashlib.sha256(data).hexdigest()
