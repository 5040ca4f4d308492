"""Tasks: embedding fidelity and similarity ranking, classification accuracy and agreement, task inference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.data import ClassificationTask, DataSplit, EmbeddingTask, infer_task, task_for
from modelpress.data.tasks import _rankdata, pool, spearman
from modelpress.errors import ModelpressError
from modelpress.graph.inputs import InputSpec


def _text_split(n: int = 40, batch: int = 8, seq: int = 12, seed: int = 0) -> DataSplit:
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        ids = torch.from_numpy(rng.integers(0, 50, (b, seq)))
        lengths = rng.integers(3, seq + 1, b)
        mask = torch.from_numpy((np.arange(seq)[None] < lengths[:, None]).astype(np.int64))
        batches.append({"input_ids": ids, "attention_mask": mask})
    return DataSplit(batches=batches)


_TABLE = np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32)


def _embedder(batch: dict[str, np.ndarray]) -> np.ndarray:
    """A fixed 'model': token embeddings from a table, [B, S, H]."""
    return _TABLE[batch["input_ids"]]


def _noisy(scale: float, seed: int = 0):  # noqa: ANN202
    rng = np.random.default_rng(seed)

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        out = _embedder(batch)
        return out + scale * rng.normal(size=out.shape).astype(np.float32)

    return run


def test_embedding_identical_is_perfect() -> None:
    split = _text_split()
    m = EmbeddingTask().evaluate(_embedder, _embedder, split)
    assert set(m) == {"fidelity_mean", "fidelity_min", "spearman"}
    assert m["fidelity_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["fidelity_min"] == pytest.approx(1.0, abs=1e-6)
    assert m["spearman"] == pytest.approx(1.0, abs=1e-9)


def test_embedding_noise_lowers_metrics_monotonically() -> None:
    split = _text_split()
    task = EmbeddingTask()
    little = task.evaluate(_noisy(0.1), _embedder, split)
    lots = task.evaluate(_noisy(1.0), _embedder, split)
    assert 0.9 < little["fidelity_mean"] < 1.0 and little["fidelity_min"] < little["fidelity_mean"]
    assert lots["fidelity_mean"] < little["fidelity_mean"]
    assert lots["spearman"] < little["spearman"] < 1.0


def test_embedding_reference_cache_reused() -> None:
    split = _text_split()
    task = EmbeddingTask()
    calls = []

    def counting(batch: dict[str, np.ndarray]) -> np.ndarray:
        calls.append(1)
        return _embedder(batch)

    cache = task.reference_cache(counting, split)
    assert len(calls) == len(split.batches) and cache.values.shape == (40, 16)
    first = task.evaluate(_noisy(0.3), None, split, reference_outputs=cache)
    second = task.evaluate(_noisy(0.3), None, split, reference_outputs=cache)
    assert len(calls) == len(split.batches)  # the reference ran once
    assert first == second
    assert first == task.evaluate(_noisy(0.3), _embedder, split)
    with pytest.raises(ValueError):
        task.evaluate(_embedder, None, _text_split(n=8), reference_outputs=cache)
    with pytest.raises(ValueError):
        task.evaluate(_embedder, None, split)


def test_pool_uses_attention_mask() -> None:
    out = np.zeros((1, 4, 2), np.float32)
    out[0, :2] = 1.0
    out[0, 2:] = 100.0  # padding positions must not count
    np.testing.assert_allclose(pool(out, np.array([[1, 1, 0, 0]])), [[1.0, 1.0]])
    np.testing.assert_allclose(pool(out[:, 0]), out[:, 0])  # [B, H] as is
    # a padding-only change leaves the metrics perfect
    split = _text_split()

    def pad_garbage(batch: dict[str, np.ndarray]) -> np.ndarray:
        out = _embedder(batch).copy()
        out[batch["attention_mask"] == 0] = 1e3
        return out

    assert EmbeddingTask().evaluate(pad_garbage, _embedder, split)["fidelity_min"] == pytest.approx(
        1.0, abs=1e-6
    )


def test_spearman_matches_scipy_and_numpy_fallback() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    b = a + rng.normal(size=200)
    a[:20] = 0.5  # ties
    ours = spearman(a, b)
    ranks_a, ranks_b = _rankdata(a), _rankdata(b)
    fallback = float(np.corrcoef(ranks_a, ranks_b)[0, 1])
    assert ours == pytest.approx(fallback, abs=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    np.testing.assert_allclose(ranks_a, scipy_stats.rankdata(a))
    assert ours == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)


def test_spearman_degenerate_split_is_nan() -> None:
    split = _text_split(n=2, batch=2)
    assert math.isnan(EmbeddingTask().evaluate(_embedder, _embedder, split)["spearman"])


def _cls_split() -> DataSplit:
    x = torch.arange(12, dtype=torch.float32).reshape(12, 1)
    labels = torch.tensor([0, 1, 2] * 4)
    return DataSplit(batches=[{"x": x[:8]}, {"x": x[8:]}], labels=[labels[:8], labels[8:]])


def _logits_for(pred: np.ndarray) -> np.ndarray:
    out = np.zeros((len(pred), 3), np.float32)
    out[np.arange(len(pred)), pred] = 5.0
    return out


def test_classification_accuracy_and_agreement() -> None:
    split = _cls_split()
    truth = np.array([0, 1, 2] * 4)

    def perfect(batch: dict[str, np.ndarray]) -> np.ndarray:
        return _logits_for(truth[batch["x"][:, 0].astype(int)])

    def three_wrong(batch: dict[str, np.ndarray]) -> np.ndarray:
        idx = batch["x"][:, 0].astype(int)
        pred = truth[idx].copy()
        pred[idx < 3] = (pred[idx < 3] + 1) % 3
        return _logits_for(pred)

    task = ClassificationTask()
    m = task.evaluate(three_wrong, perfect, split)
    assert m["accuracy"] == pytest.approx(9 / 12)
    assert m["agreement"] == pytest.approx(9 / 12)
    best = task.evaluate(perfect, None, split)
    assert best == pytest.approx({"accuracy": 1.0, "cross_entropy": math.log(1 + 2 * math.exp(-5))})
    assert m["cross_entropy"] > best["cross_entropy"]
    cache = task.reference_cache(perfect, split)
    assert task.evaluate(three_wrong, None, split, reference_outputs=cache) == m


def test_classification_without_labels() -> None:
    split = DataSplit(batches=_cls_split().batches)

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        return _logits_for(np.zeros(len(batch["x"]), int))

    out = ClassificationTask().evaluate(run, run, split)
    assert out == pytest.approx({"agreement": 1.0, "logit_cosine": 1.0, "logit_cosine_min": 1.0})
    with pytest.raises(ModelpressError, match="labels"):
        ClassificationTask().evaluate(run, None, split)


def test_task_for() -> None:
    assert isinstance(task_for("embedding"), EmbeddingTask)
    assert task_for("classification").name == "classification"
    with pytest.raises(ModelpressError, match="unknown task"):
        task_for("translation")


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.emb(input_ids)


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_infer_task() -> None:
    text = InputSpec(kind="text", names=["input_ids", "attention_mask"], vocab_size=100)
    assert isinstance(infer_task(text, _Encoder()), EmbeddingTask)
    tensor = InputSpec(kind="tensor", names=["x"], shape=(4,))
    assert isinstance(infer_task(tensor, _Classifier()), ClassificationTask)


def test_infer_task_hf_models() -> None:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    text = InputSpec(kind="text", names=["input_ids", "attention_mask", "token_type_ids"], vocab_size=200)
    assert isinstance(infer_task(text, BertModel(cfg)), EmbeddingTask)
    assert isinstance(infer_task(text, BertForSequenceClassification(cfg)), ClassificationTask)


def test_infer_task_zoo(zoo_cnn) -> None:  # noqa: ANN001
    assert isinstance(infer_task(zoo_cnn.input_spec, zoo_cnn.module), ClassificationTask)
