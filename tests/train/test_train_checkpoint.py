"""Training checkpoints: one safetensors file (no pickle) with JSON metadata, replaced atomically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from modelpress.data import ClassificationTask, DataSplit
from modelpress.errors import ModelpressError
from modelpress.train import CHECKPOINT_NAME, TrainConfig, load_checkpoint, train
from modelpress.train import checkpoint as checkpoint_module


def _run(tmp_path, steps: int = 6) -> nn.Module:  # noqa: ANN001
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    data = DataSplit(batches=[{"x": torch.randn(10, 4)}])
    config = TrainConfig(
        steps=steps, schedule="constant", batch_size=4, checkpoint_every=2, checkpoint_dir=tmp_path
    )
    train(student, data, task=ClassificationTask(), teacher=teacher, config=config)
    return student


def test_checkpoint_holds_everything_a_resume_needs(tmp_path) -> None:  # noqa: ANN001
    student = _run(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    with safe_open(str(path), framework="pt") as f:  # plain safetensors: readable without pickle
        keys = set(f.keys())
        meta = json.loads(f.metadata()["modelpress_train"])
        torch.testing.assert_close(f.get_tensor("student.weight"), student.weight.detach(), rtol=0, atol=0)
    assert {"student.weight", "student.bias", "rng.torch", "rng.data", "data.order"} <= keys
    assert {
        "optimizer.0.exp_avg",
        "optimizer.0.exp_avg_sq",
        "optimizer.0.step",
        "optimizer.1.exp_avg",
    } <= keys
    assert meta["step"] == 6 and meta["epoch"] == 2 and meta["position"] == 10  # 10 samples: batches 4, 4, 2
    assert meta["recipe"]["lr"] == 1e-4 and meta["samples"] == 10
    assert meta["optimizer"]["param_groups"][0]["weight_decay"] == 0.01 and "last_epoch" in meta["scheduler"]
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.state().step == 6
    assert sorted(loaded.state().order.tolist()) == list(range(10))  # the epoch's sample order
    assert load_checkpoint(tmp_path / "elsewhere") is None


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    _run(tmp_path, steps=2)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    import safetensors.torch

    real = safetensors.torch.save_file

    def crash(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        real(tensors, filename, metadata)
        with open(filename, "r+b") as f:  # a half-written file, then the machine goes down
            f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        _run(tmp_path, steps=4)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temporary file left
    assert load_checkpoint(tmp_path).meta["step"] == 2


def test_foreign_or_broken_files_are_refused(tmp_path) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / CHECKPOINT_NAME))
    with pytest.raises(ModelpressError, match="not a modelpress training checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"\x00" * 10)
    with pytest.raises(ModelpressError, match="cannot read"):
        load_checkpoint(tmp_path)
    assert checkpoint_module.FORMAT_VERSION == 1
