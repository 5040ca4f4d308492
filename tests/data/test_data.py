"""Data sources, tasks and runners on real data (packaged sentences, MiniLM's tokenizer, digits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.data import (
    ClassificationTask,
    DataSplit,
    EmbeddingTask,
    load_data,
    onnx_runner,
    packaged_sentences,
    torch_runner,
)
from modelpress.errors import ModelpressError
from modelpress.graph import InputSpec

IMG = InputSpec("image", ["pixel_values"], shape=(1, 8, 8))


def test_packaged_sentences_disjoint():
    cal, ev = packaged_sentences("calibration"), packaged_sentences("evaluation")
    assert len(cal) >= 150 and len(ev) >= 200
    assert not set(cal) & set(ev)
    assert len(set(ev)) == len(ev)


def test_default_text_data(minilm):
    data = load_data(None, minilm.input_spec, minilm.tokenizer, n_calibration=32, n_evaluation=48)
    assert len(data.calibration) == 32 and len(data.evaluation) == 48
    b = data.evaluation.batches[0]
    assert set(b) == set(minilm.input_spec.names)
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == b["attention_mask"].shape


def test_digits():
    data = load_data("digits", IMG, n_calibration=64, n_evaluation=100)
    x = torch.cat([b["pixel_values"] for b in data.evaluation.batches])
    assert x.shape == (100, 1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1
    labels = torch.cat(data.evaluation.labels)
    assert len(set(labels.tolist())) == 10


def test_tensors_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        pixel_values=rng.random((40, 1, 8, 8), dtype=np.float32),
        labels=np.arange(40) % 10,
    )
    data = load_data(f"tensors:{tmp_path / 'd.npz'}", IMG, n_calibration=10, n_evaluation=30)
    assert len(data.calibration) == 10 and len(data.evaluation) == 30 and data.evaluation.labels is not None


@pytest.mark.parametrize("spec", ["nope", "text:/no/such/file", "tensors:/no/such.npz", "images:/no/dir"])
def test_bad_specs(spec):
    with pytest.raises(ModelpressError):
        load_data(spec, IMG)


def test_no_default_for_images():
    with pytest.raises(ModelpressError, match="no default data"):
        load_data(None, IMG)


def test_wrong_shape(tmp_path):
    np.savez(tmp_path / "d.npz", pixel_values=np.zeros((4, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ModelpressError, match="shape"):
        load_data(f"tensors:{tmp_path / 'd.npz'}", IMG)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_samples_are_refused_by_row(tmp_path, bad):
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    x[3, 0, 2, 2] = bad
    x[11, 0, 0, 0] = -bad
    np.savez(tmp_path / "d.npz", pixel_values=x)
    with pytest.raises(ModelpressError, match=r"NaN or infinite values in 2 of 20 samples \(rows 3, 11\)"):
        load_data(f"tensors:{tmp_path / 'd.npz'}", IMG)


def test_embedding_task_detects_noise(minilm):
    data = load_data(None, minilm.input_spec, minilm.tokenizer, n_calibration=8, n_evaluation=64)
    ref = torch_runner(minilm.module, minilm.input_spec.names)
    task = EmbeddingTask()
    same = task.evaluate(ref, ref, data.evaluation)
    assert same["fidelity_mean"] > 0.9999 and same["spearman"] > 0.9999
    rng = np.random.default_rng(0)

    def noisy(batch):
        y = ref(batch)
        return y + rng.normal(0, 0.3, y.shape).astype(np.float32)

    worse = task.evaluate(noisy, ref, data.evaluation)
    assert worse["fidelity_mean"] < 0.99 and worse["spearman"] < same["spearman"]


def test_classification_task():
    split = DataSplit([{"x": torch.zeros(4, 2)}], [torch.tensor([0, 1, 1, 0])])
    logits = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=np.float32)
    m = ClassificationTask().evaluate(lambda b: logits, lambda b: logits, split)
    assert m["accuracy"] == 0.75 and m["agreement"] == 1.0


def test_onnx_runner_matches_torch(tmp_path):
    from modelpress.export import export_onnx

    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    export_onnx(module, IMG, tmp_path / "m.onnx", optimize="none")
    batch = IMG.make(3)
    np.testing.assert_allclose(
        onnx_runner(tmp_path / "m.onnx")(batch), torch_runner(module, ["pixel_values"])(batch), atol=1e-5
    )
