"""Tasks: how a compressed model is evaluated against the data and the original model, and the loss that
recovers it (``Task.loss``, on torch tensors, used by ``modelpress.train``).

A :data:`Runner` maps a batch of numpy inputs to the model's primary output, so one Task evaluates torch
modules and ONNX files alike. The reference (original model) outputs can be computed once with
``task.reference_cache(reference, split)`` and passed to ``evaluate`` for every candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from modelpress.data.runners import Runner, torch_runner
from modelpress.data.sources import DataSplit
from modelpress.errors import ModelpressError
from modelpress.graph.inputs import InputSpec
from modelpress.graph.run import call_module

__all__ = [
    "ClassificationTask",
    "EmbeddingTask",
    "ReferenceOutputs",
    "Runner",
    "Task",
    "infer_task",
    "task_for",
]


@dataclass
class ReferenceOutputs:
    """A task's summary of the reference model's outputs on one split (one row per sample)."""

    task: str
    values: np.ndarray
    n_samples: int


class Task:
    """How to evaluate and how to train: subclasses set ``name`` and implement ``summarize``, ``metrics``
    and ``loss``."""

    name: ClassVar[str] = ""

    def loss(
        self,
        student_output: torch.Tensor,
        teacher_output: torch.Tensor | None,
        batch: dict[str, torch.Tensor],
        *,
        temperature: float = 1.0,
        label_weight: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """The differentiable training loss of one batch: the student's primary output against the teacher's
        (distillation from the original model) and/or the batch's ``"labels"``."""
        raise ModelpressError(
            f"the {self.name or type(self).__name__} task has no training loss",
            "train with a task that defines one (classification, embedding)",
        )

    def summarize(self, output: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Per-sample values the metrics need from one batch's primary output."""
        raise NotImplementedError

    def metrics(
        self, candidate: np.ndarray, reference: np.ndarray | None, split: DataSplit
    ) -> dict[str, float]:  # pragma: no cover - interface
        """Metrics from the candidate's (and reference's) summarized outputs over the whole split."""
        raise NotImplementedError

    def outputs(self, runner: Runner, split: DataSplit) -> np.ndarray:
        """Run ``runner`` over every batch and stack the summarized outputs (one row per sample)."""
        rows = []
        for batch in split.numpy_batches():
            out = np.asarray(runner(batch))
            if out.shape[0] != _batch_len(batch):
                raise ValueError(f"runner returned {out.shape[0]} rows for a batch of {_batch_len(batch)}")
            rows.append(self.summarize(out.astype(np.float32, copy=False), batch))
        return np.concatenate(rows, axis=0)

    def reference_cache(self, reference: Runner, split: DataSplit) -> ReferenceOutputs:
        """Compute the reference model's outputs once, to evaluate several candidates against them."""
        return ReferenceOutputs(task=self.name, values=self.outputs(reference, split), n_samples=len(split))

    def evaluate(
        self,
        candidate: Runner,
        reference: Runner | None,
        split: DataSplit,
        *,
        reference_outputs: ReferenceOutputs | None = None,
    ) -> dict[str, float]:
        """Metrics of ``candidate`` on ``split``; against ``reference`` (or its cached outputs) when given."""
        ref_values = None
        if reference_outputs is not None:
            if reference_outputs.task != self.name or reference_outputs.n_samples != len(split):
                raise ValueError(
                    f"reference outputs are for task {reference_outputs.task!r} with "
                    f"{reference_outputs.n_samples} samples, not {self.name!r} with {len(split)}"
                )
            ref_values = reference_outputs.values
        elif reference is not None:
            ref_values = self.outputs(reference, split)
        return self.metrics(self.outputs(candidate, split), ref_values, split)


class EmbeddingTask(Task):
    """Sentence/feature embeddings: cosine fidelity to the reference and ranking of pairwise similarities.

    Outputs [B, S, H] are mean-pooled over the attention mask; [B, H] are used as they are. Metrics:
    ``fidelity_mean``/``fidelity_min`` (per-sample cosine of candidate vs reference embeddings) and
    ``spearman`` (rank correlation of all pairwise cosine similarities, candidate vs reference).
    """

    name: ClassVar[str] = "embedding"

    def __init__(self, mse_weight: float = 0.0) -> None:
        self.mse_weight = float(mse_weight)

    def loss(
        self,
        student_output: torch.Tensor,
        teacher_output: torch.Tensor | None,
        batch: dict[str, torch.Tensor],
        *,
        temperature: float = 1.0,
        label_weight: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Mean over the batch of ``1 - cosine`` between the student's and the teacher's embeddings (both
        pooled like :func:`pool`: mean over the attention mask's tokens), plus ``mse_weight`` times their mean
        squared difference (0 by default: cosine only, the fidelity metric's own measure).

        Label-free: ``labels``, ``temperature``, ``label_weight`` and ``label_smoothing`` are ignored.
        """
        if teacher_output is None:
            raise ModelpressError(
                "the embedding task trains by distillation and needs the original model as teacher",
                "pass teacher= (the unpruned model)",
            )
        mask = batch.get("attention_mask")
        student = pool_torch(student_output, mask)
        teacher = pool_torch(teacher_output.to(student.dtype), mask)
        out = 1.0 - torch.nn.functional.cosine_similarity(student, teacher, dim=1, eps=1e-8).mean()
        if self.mse_weight:
            out = out + self.mse_weight * torch.nn.functional.mse_loss(student, teacher)
        return out

    def summarize(self, output: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
        return pool(output, batch.get("attention_mask"))

    def metrics(
        self, candidate: np.ndarray, reference: np.ndarray | None, split: DataSplit
    ) -> dict[str, float]:
        if reference is None:
            raise ValueError("the embedding task compares with the original model: pass a reference")
        if candidate.shape != reference.shape:
            raise ValueError(
                f"embedding shapes differ: candidate {candidate.shape}, reference {reference.shape}"
            )
        fidelity = _cosine_rows(candidate, reference)
        return {
            "fidelity_mean": float(fidelity.mean()),
            "fidelity_min": float(fidelity.min()),
            "spearman": similarity_spearman(candidate, reference),
        }


class ClassificationTask(Task):
    """Classifiers: ``accuracy`` and ``cross_entropy`` against labels, ``agreement`` (same argmax) with
    the reference when one is given."""

    name: ClassVar[str] = "classification"

    def loss(
        self,
        student_output: torch.Tensor,
        teacher_output: torch.Tensor | None,
        batch: dict[str, torch.Tensor],
        *,
        temperature: float = 1.0,
        label_weight: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Distillation from the teacher's logits, mixed with label cross-entropy when asked for.

        With a teacher: ``T^2 * KL(teacher || student)`` on logits divided by the temperature ``T`` (mean
        over samples), and, when the batch has ``"labels"`` and ``label_weight`` w > 0,
        ``(1 - w) * that + w * cross_entropy(student, labels)``. Without a teacher: the label cross-entropy
        alone (the batch must have labels). ``label_smoothing`` applies to the cross-entropy.
        """
        labels = batch.get("labels")
        if teacher_output is None:
            if labels is None:
                raise ModelpressError(
                    "training a classifier without a teacher needs labels, and the data has none",
                    "pass teacher= (the original model) to distil from it, or labelled data",
                )
            return torch.nn.functional.cross_entropy(student_output, labels, label_smoothing=label_smoothing)
        t = float(temperature)
        distill = torch.nn.functional.kl_div(
            torch.log_softmax(student_output / t, dim=1),
            torch.log_softmax(teacher_output.to(student_output.dtype) / t, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * (t * t)
        if labels is None or label_weight <= 0:
            return distill
        ce = torch.nn.functional.cross_entropy(student_output, labels, label_smoothing=label_smoothing)
        return (1.0 - label_weight) * distill + label_weight * ce

    def summarize(self, output: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
        if output.ndim != 2:
            raise ValueError(f"classification needs logits of shape [batch, classes], got {output.shape}")
        return output

    def metrics(
        self, candidate: np.ndarray, reference: np.ndarray | None, split: DataSplit
    ) -> dict[str, float]:
        labels = split.all_labels()
        if labels is None and reference is None:
            raise ModelpressError(
                "classification needs labels or the original model to compare with; the data has no labels",
                "pass labelled data: --data digits | images:DIR (subfolders = classes) | tensors:FILE.npz "
                "with a 'labels' array",
            )
        pred = candidate.argmax(axis=1)
        out: dict[str, float] = {}
        if labels is not None:
            if labels.min() < 0 or labels.max() >= candidate.shape[1]:
                raise ModelpressError(
                    f"labels range from {labels.min()} to {labels.max()}; "
                    f"the model has {candidate.shape[1]} classes",
                    "check that the data's classes match the model's",
                )
            out["accuracy"] = float((pred == labels).mean())
            logp = torch.log_softmax(torch.from_numpy(candidate).double(), dim=1).numpy()
            out["cross_entropy"] = float(-logp[np.arange(len(labels)), labels].mean())
        if reference is not None:
            out["agreement"] = float((pred == reference.argmax(axis=1)).mean())
        return out


TASKS: dict[str, type[Task]] = {"embedding": EmbeddingTask, "classification": ClassificationTask}


def task_for(kind: str) -> Task:
    """The task called ``kind`` ("embedding" or "classification")."""
    try:
        return TASKS[kind]()
    except KeyError:
        raise ModelpressError(f"unknown task {kind!r}", f"choose one of: {', '.join(TASKS)}") from None


def infer_task(input_spec: InputSpec, module: torch.nn.Module) -> Task:
    """Guess the task from one forward pass: logits -> classification, hidden states -> embedding.

    Falls back to the output rank ([B, S, H] -> embedding, [B, C] -> classification), and when the model
    cannot run on sample inputs, to the input kind (text -> embedding, otherwise classification).
    """
    if "Classification" in type(module).__name__:
        return ClassificationTask()
    try:
        sample = input_spec.make(batch=2, seq_len=8)
        raw = _raw_forward(module, input_spec.names, sample)
    except Exception:  # noqa: BLE001 - any failure: decide from the input kind
        return EmbeddingTask() if input_spec.kind == "text" else ClassificationTask()
    for key, task in (("logits", ClassificationTask), ("last_hidden_state", EmbeddingTask)):
        value = raw.get(key) if isinstance(raw, dict) else getattr(raw, key, None)
        if isinstance(value, torch.Tensor):
            return task()
    out = torch_runner(module, input_spec.names)(sample)
    if out.ndim == 3:
        return EmbeddingTask()
    if out.ndim == 2 and input_spec.kind == "text" and out.shape[1] > 64:
        return EmbeddingTask()  # a pooled sentence embedding, not a handful of class logits
    return ClassificationTask()


# -- numerics ------------------------------------------------------------------------------------------------


def pool(output: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Mean-pool [B, S, H] over the tokens the mask keeps; [B, H] as is; higher ranks flattened."""
    output = np.asarray(output, dtype=np.float32)
    if output.ndim == 2:
        return output
    if output.ndim == 3:
        if attention_mask is None or attention_mask.shape != output.shape[:2]:
            return output.mean(axis=1)
        mask = attention_mask.astype(np.float32)[:, :, None]
        return (output * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    return output.reshape(output.shape[0], -1)


def pool_torch(output: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`pool` on torch tensors, differentiable: [B, S, H] mean over the mask's tokens; [B, H] as is."""
    if output.ndim == 2:
        return output
    if output.ndim == 3:
        if attention_mask is None or tuple(attention_mask.shape) != tuple(output.shape[:2]):
            return output.mean(dim=1)
        mask = attention_mask.to(output.dtype).unsqueeze(-1)
        return (output * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
    return output.reshape(output.shape[0], -1)


def similarity_spearman(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Spearman correlation between the upper triangles of the two pairwise cosine-similarity matrices.

    NaN when there are fewer than three samples (fewer than three pairs to rank)."""
    n = candidate.shape[0]
    if n < 3:
        return float("nan")
    iu = np.triu_indices(n, k=1)
    a = _cosine_matrix(candidate)[iu]
    b = _cosine_matrix(reference)[iu]
    return spearman(a, b)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (scipy when installed, else ranks with ties averaged in numpy)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return _pearson(_rankdata(a), _rankdata(b))
    return float(spearmanr(a, b).statistic)


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as scipy.stats.rankdata(method='average'))."""
    x = np.asarray(x).ravel()
    order = np.argsort(x, kind="mergesort")
    inverse = np.empty(len(x), dtype=np.intp)
    inverse[order] = np.arange(len(x))
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    dense = first.cumsum()[inverse]
    bounds = np.r_[np.nonzero(first)[0], len(x)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float("nan") if denom == 0 else float((a * b).sum() / denom)


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(axis=1) / denom


def _cosine_matrix(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x @ x.T


def _batch_len(batch: dict[str, np.ndarray]) -> int:
    return int(next(iter(batch.values())).shape[0])


def _raw_forward(module: torch.nn.Module, names: list[str], sample: dict[str, np.ndarray]) -> Any:
    with torch.no_grad():
        return call_module(module, {k: torch.from_numpy(v) for k, v in sample.items()}, names)
