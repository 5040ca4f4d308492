"""Task.loss: the training losses, checked against hand computations, differentiable, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modelpress.data import ClassificationTask, EmbeddingTask, Task
from modelpress.data.tasks import pool, pool_torch
from modelpress.errors import ModelpressError


def _softmax(x: list[float]) -> list[float]:
    e = [math.exp(v) for v in x]
    return [v / sum(e) for v in e]


def test_classification_distillation_by_hand() -> None:
    student = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    t = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p = _softmax([v / t for v in t_row])
        q = _softmax([v / t for v in s_row])
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected = expected / 2 * t * t  # mean over the 2 samples, times T^2
    loss = ClassificationTask().loss(student, teacher, {}, temperature=t)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    same = ClassificationTask().loss(teacher.clone(), teacher, {}, temperature=t)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_classification_labels_mixed_by_weight() -> None:
    student = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([1, 2])
    ce = -(math.log(_softmax([1.0, 2.0, 0.0])[1]) + math.log(_softmax([0.5, -1.0, 2.0])[2])) / 2
    task = ClassificationTask()
    kd = task.loss(student, teacher, {}).item()
    batch = {"labels": labels}
    assert task.loss(student, teacher, batch, label_weight=0.0).item() == pytest.approx(
        kd
    )  # pure distillation
    assert task.loss(student, teacher, batch, label_weight=0.25).item() == pytest.approx(
        0.75 * kd + 0.25 * ce
    )
    assert task.loss(student, None, batch).item() == pytest.approx(ce)  # no teacher: labels alone
    smooth = task.loss(student, None, batch, label_smoothing=0.1).item()
    assert smooth == pytest.approx(
        torch.nn.functional.cross_entropy(student, labels, label_smoothing=0.1).item()
    ) and smooth != pytest.approx(ce)
    with pytest.raises(ModelpressError, match="needs labels"):
        task.loss(student, None, {})


def test_embedding_loss_by_hand_and_mask() -> None:
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]], requires_grad=True)  # [1, 3, 2]
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-5.0, 7.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding: ignored
    # pooled: student (0.5, 0.5), teacher (1, 0) -> cosine 0.5 / (sqrt(0.5) * 1)
    expected = 1 - 0.5 / math.sqrt(0.5)
    loss = EmbeddingTask().loss(s, t, {"attention_mask": mask})
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert s.grad is not None and torch.all(s.grad[0, 2] == 0)  # padding gets no gradient
    mse = EmbeddingTask(mse_weight=2.0).loss(s, t, {"attention_mask": mask})
    assert mse.item() == pytest.approx(expected + 2.0 * (0.25 + 0.25) / 2, rel=1e-6)
    scaled = EmbeddingTask().loss(3 * t, t, {"attention_mask": mask})
    assert scaled.item() == pytest.approx(0.0, abs=1e-6)  # cosine ignores scale
    with pytest.raises(ModelpressError, match="teacher"):
        EmbeddingTask().loss(s, None, {})


def test_embedding_token_losses_by_hand() -> None:
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]], requires_grad=True)  # [1, 3, 2]
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-5.0, 7.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding: ignored
    pooled = 1 - 0.5 / math.sqrt(0.5)
    tokens = ((1 - 1) + (1 - 0)) / 2  # per-token cosine 1 and 0 over the two real tokens
    token_mse = (0.0 + (1 + 1) / 2) / 2  # per token: mean over the hidden units, then over the real tokens
    loss = EmbeddingTask.distillation("tokens").loss(s, t, {"attention_mask": mask})
    assert loss.item() == pytest.approx(tokens, rel=1e-6)
    loss.backward()
    assert s.grad is not None and torch.all(s.grad[0, 2] == 0)
    both = EmbeddingTask.distillation("pooled+tokens", mse_weight=0.5).loss(s, t, {"attention_mask": mask})
    assert both.item() == pytest.approx(pooled + 0.5 * (0.25 + 0.25) / 2 + tokens + 0.5 * token_mse, rel=1e-6)
    default = EmbeddingTask.distillation().loss(s, t, {"attention_mask": mask})
    assert default.item() == EmbeddingTask().loss(s, t, {"attention_mask": mask}).item()  # unchanged default
    no_mask = EmbeddingTask(pooled_weight=0, token_cosine_weight=1).loss(s, t, {})
    assert no_mask.item() == pytest.approx((0 + 1 + (1 - (-45 + 63) / (math.sqrt(162) * math.sqrt(74)))) / 3, rel=1e-6)
    with pytest.raises(ModelpressError, match="per-token"):
        EmbeddingTask.distillation("tokens").loss(s[:, 0], t[:, 0], {})
    with pytest.raises(ModelpressError, match="unknown embedding distillation loss"):
        EmbeddingTask.distillation("cls")
    with pytest.raises(ModelpressError, match="weights"):
        EmbeddingTask(pooled_weight=0)
    assert EmbeddingTask.distillation("tokens").loss_settings()["token_cosine_weight"] == 1.0


def test_pool_torch_matches_numpy_pool() -> None:
    rng = np.random.default_rng(0)
    out = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = (np.arange(5)[None] < np.array([[2], [5], [1]])).astype(np.int64)
    for m in (mask, None):
        got = pool_torch(torch.from_numpy(out), None if m is None else torch.from_numpy(m)).numpy()
        np.testing.assert_allclose(got, pool(out, m), rtol=1e-6)
    flat = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(pool_torch(torch.from_numpy(flat)).numpy(), flat)


def test_task_without_loss() -> None:
    class Plain(Task):
        name = "plain"

    with pytest.raises(ModelpressError, match="no training loss"):
        Plain().loss(torch.zeros(1, 2), None, {})
