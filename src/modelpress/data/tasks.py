"""Tasks: how a compressed model is evaluated against the data and the original model, and the loss that
recovers it (``Task.loss``, on torch tensors, used by ``modelpress.train``).

A :data:`Runner` maps a batch of numpy inputs to the model's primary output, so one Task evaluates torch
modules and ONNX files alike. The reference (original model) outputs can be computed once with
``task.reference_cache(reference, split)`` and passed to ``evaluate`` for every candidate.
"""

from __future__ import annotations

import math
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
    "EMBEDDING_LOSSES",
    "ClassificationTask",
    "EmbeddingTask",
    "LanguageModelTask",
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
    detail: Any = None  # task-specific extras (the language-model task: per-batch reference log-probs)


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
            "train with a task that defines one (classification, embedding, language-model)",
        )

    def loss_settings(self) -> dict[str, float]:
        """The settings that shape :meth:`loss` (a training checkpoint records them, and a resume must match)."""
        return {}

    def summarize(self, output: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Per-sample values the metrics need from one batch's primary output."""
        raise NotImplementedError

    def fisher_loss(
        self,
        output: torch.Tensor,
        reference: torch.Tensor,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """A loss whose squared gradients estimate the curvature of distilling from ``reference``.

        At the unpruned model the distillation loss and its gradient vanish, so squared gradients of that
        loss carry no information. Drawing the targets from the reference's predictive distribution (a
        Monte-Carlo Fisher) keeps the expected gradient equal to the distillation gradient while
        ``E[(w . g)^2]`` estimates ``w^T F w``, the second-order loss change of removing ``w`` (NViT's
        Hessian-aware saliency, label-free). ``generator`` draws the targets (seeded by the caller).
        """
        raise ModelpressError(
            f"the {self.name or type(self).__name__} task has no curvature loss for gradient saliency",
            "use saliency=magnitude, or a classification, embedding or language-model task",
        )

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

    def __init__(
        self,
        mse_weight: float = 0.0,
        *,
        pooled_weight: float = 1.0,
        token_cosine_weight: float = 0.0,
        token_mse_weight: float = 0.0,
    ) -> None:
        weights = {"mse_weight": mse_weight, "pooled_weight": pooled_weight,
                   "token_cosine_weight": token_cosine_weight, "token_mse_weight": token_mse_weight}
        bad = {k: v for k, v in weights.items() if not (float(v) >= 0 and math.isfinite(float(v)))}
        if bad or not any(float(v) > 0 for v in weights.values()):
            raise ModelpressError(
                f"invalid embedding loss weights {bad or weights}",
                "give non-negative weights, at least one of them positive",
            )
        self.mse_weight = float(mse_weight)
        self.pooled_weight = float(pooled_weight)
        self.token_cosine_weight = float(token_cosine_weight)
        self.token_mse_weight = float(token_mse_weight)

    @classmethod
    def distillation(cls, loss: str = "pooled", mse_weight: float = 0.0) -> EmbeddingTask:
        """The embedding task with one of the named distillation losses (:data:`EMBEDDING_LOSSES`):

        - ``"pooled"`` (the default): ``1 - cosine`` of the mask-pooled embeddings, the fidelity metric's
          own measure; ``mse_weight`` adds their mean squared difference;
        - ``"tokens"``: ``1 - cosine`` per token of the last hidden states, averaged over the tokens the
          attention mask keeps; ``mse_weight`` adds the per-token mean squared difference;
        - ``"pooled+tokens"``: the sum of both.
        """
        if loss not in EMBEDDING_LOSSES:
            raise ModelpressError(
                f"unknown embedding distillation loss {loss!r}", f"choose one of: {', '.join(EMBEDDING_LOSSES)}"
            )
        pooled, tokens = loss in ("pooled", "pooled+tokens"), loss in ("tokens", "pooled+tokens")
        return cls(
            mse_weight=mse_weight if pooled else 0.0,
            pooled_weight=1.0 if pooled else 0.0,
            token_cosine_weight=1.0 if tokens else 0.0,
            token_mse_weight=mse_weight if tokens else 0.0,
        )

    def loss_settings(self) -> dict[str, float]:
        return {"pooled_weight": self.pooled_weight, "mse_weight": self.mse_weight,
                "token_cosine_weight": self.token_cosine_weight, "token_mse_weight": self.token_mse_weight}

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
        """Distillation of the teacher's embeddings, a weighted sum of (weights from the constructor):

        - ``pooled_weight`` (1 by default) times the batch mean of ``1 - cosine`` between the student's and the
          teacher's embeddings, both pooled like :func:`pool` (mean over the attention mask's tokens);
        - ``mse_weight`` (0 by default) times their mean squared difference;
        - ``token_cosine_weight`` (0 by default) times ``1 - cosine`` of every token's hidden state
          ([B, S, H] outputs), averaged over the tokens the mask keeps;
        - ``token_mse_weight`` (0 by default) times the per-token mean squared difference, over the same
          tokens and every hidden unit.

        The defaults give the pooled cosine alone, the fidelity metric's own measure. Label-free: ``labels``,
        ``temperature``, ``label_weight`` and ``label_smoothing`` are ignored.
        """
        if teacher_output is None:
            raise ModelpressError(
                "the embedding task trains by distillation and needs the original model as teacher",
                "pass teacher= (the unpruned model)",
            )
        mask = batch.get("attention_mask")
        teacher_output = teacher_output.to(student_output.dtype)
        out = student_output.new_zeros(())
        if self.pooled_weight or self.mse_weight:
            student = pool_torch(student_output, mask)
            teacher = pool_torch(teacher_output, mask)
            if self.pooled_weight:
                cos = torch.nn.functional.cosine_similarity(student, teacher, dim=1, eps=1e-8).mean()
                out = out + self.pooled_weight * (1.0 - cos)
            if self.mse_weight:
                out = out + self.mse_weight * torch.nn.functional.mse_loss(student, teacher)
        if self.token_cosine_weight or self.token_mse_weight:
            if student_output.ndim != 3:
                raise ModelpressError(
                    f"per-token distillation needs hidden states [batch, sequence, hidden]; the model's output "
                    f"has shape {tuple(student_output.shape)}",
                    "use the pooled loss (loss: pooled) for models that output one embedding per sample",
                )
            weights = _token_weights(mask, student_output)
            count = weights.sum().clamp_min(1.0)
            if self.token_cosine_weight:
                cos = torch.nn.functional.cosine_similarity(student_output, teacher_output, dim=-1, eps=1e-8)
                out = out + self.token_cosine_weight * ((1.0 - cos) * weights).sum() / count
            if self.token_mse_weight:
                sq = (student_output - teacher_output).pow(2).mean(dim=-1)
                out = out + self.token_mse_weight * (sq * weights).sum() / count
        return out

    def summarize(self, output: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
        return pool(output, batch.get("attention_mask"))

    def fisher_loss(
        self,
        output: torch.Tensor,
        reference: torch.Tensor,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Gauss-Newton curvature of embedding distillation: ``0.5 * ||(e - e_ref) / rms(e_ref) - n||^2`` on
        the pooled embeddings (mean over the attention mask, as the metrics pool), ``n ~ N(0, I)``; its
        squared gradients estimate ``J^T J`` of the normalized embedding (see :meth:`Task.fisher_loss`).
        Pooled rather than per-token: on MiniLM at half the MACs (hessian, 64 sentences) it kept a mean
        fidelity of 0.721 against 0.690 with per-token hidden states."""
        mask = batch.get("attention_mask")
        out = pool_torch(output, mask)
        ref = pool_torch(reference.to(output.dtype), mask)
        scale = ref.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)
        noise = torch.randn(ref.shape, generator=generator, dtype=out.dtype).to(out.device)
        return 0.5 * ((out - ref) / scale - noise).pow(2).sum(dim=-1).mean()

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
    """Classifiers: ``accuracy`` and ``cross_entropy`` against labels; with a reference, ``agreement`` (same
    argmax) and ``logit_cosine`` / ``logit_cosine_min`` (per-sample cosine of the centered logits)."""

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

    def fisher_loss(
        self,
        output: torch.Tensor,
        reference: torch.Tensor,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Cross-entropy against classes drawn from the reference's softmax (the true Fisher of the
        distillation loss; see :meth:`Task.fisher_loss`)."""
        probs = torch.softmax(reference.detach().double(), dim=-1).cpu()
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(output.device)
        return torch.nn.functional.cross_entropy(output, drawn)

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
            # logits are defined up to a per-sample constant (softmax ignores it; an ensemble returns
            # log-probabilities): compare them centered
            cos = _cosine_rows(candidate - candidate.mean(1, keepdims=True), reference - reference.mean(1, keepdims=True))
            out["logit_cosine"], out["logit_cosine_min"] = float(cos.mean()), float(cos.min())
        return out


class LanguageModelTask(Task):
    """Causal language models: next-token fidelity to the original model, and perplexity on held-out text.

    The primary output is logits [B, S, V]; position ``t`` predicts token ``t + 1``. A position counts
    when both it and the next token are real (``attention_mask`` 1 at ``t`` and ``t + 1``; all positions
    without a mask), so padding on either side is ignored. Metrics (means over counted positions):

    * ``next_token_kl``: KL(reference || candidate) of the next-token distributions;
    * ``top1_agreement``: how often both models rank the same next token first;
    * ``perplexity``: ``exp`` of the candidate's mean negative log-likelihood of the actual next tokens
      (``input_ids`` shifted by one), and ``reference_perplexity``, the original model's.

    Memory and time: logits are never kept for the whole split, and the metrics are computed a few samples
    at a time. ``reference_cache`` keeps the reference's log-probabilities (float32) while the split's
    [N, S, V] fits in ``cache_bytes`` (256 MiB: e.g. 200 sentences x 32 tokens x 10k vocabulary); a larger
    split (GPT-2's 50k vocabulary) keeps only the reference runner, and every evaluation runs the reference
    again batch by batch: one more forward of the original model per evaluation, for exact KL at about two
    batches of logits of memory (measured: 200 samples x 40 tokens x 50257, 130 MB above the logits).
    Keeping only the reference's top 64 tokens and the rest as one bucket was tried and rejected: on flat
    50k-vocabulary distributions it underestimated KL 46-fold.
    """

    name: ClassVar[str] = "language-model"

    def __init__(self, cache_bytes: int = 256 * 2**20, chunk: int = 4) -> None:
        self.cache_bytes = int(cache_bytes)
        self.chunk = max(1, int(chunk))

    # ----- training
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
        """Label-free distillation: ``T^2 * KL(teacher || student)`` of the next-token distributions at
        temperature ``T``, averaged over the counted positions (see the class). With ``label_weight`` w > 0,
        ``(1 - w) * that + w * cross_entropy`` against the next tokens (``input_ids`` shifted by one);
        without a teacher, that cross-entropy alone (language modelling needs no other labels)."""
        ids = batch.get("input_ids")
        weights = _next_token_weights(batch.get("attention_mask"), student_output.shape[:2], student_output.device)
        count = weights.sum().clamp_min(1.0)
        ce = None
        if ids is not None and (teacher_output is None or label_weight > 0):
            logits = student_output[:, :-1].reshape(-1, student_output.shape[-1])
            per_token = torch.nn.functional.cross_entropy(
                logits, ids[:, 1:].reshape(-1).to(logits.device), reduction="none", label_smoothing=label_smoothing
            )
            ce = (per_token * weights[:, :-1].reshape(-1)).sum() / count
        if teacher_output is None:
            if ce is None:
                raise ModelpressError(
                    "training a language model without a teacher needs input_ids to predict",
                    "give text data, or pass teacher= (the original model)",
                )
            return ce
        t = float(temperature)
        log_s = torch.log_softmax(student_output / t, dim=-1)
        log_t = torch.log_softmax(teacher_output.to(student_output.dtype) / t, dim=-1)
        kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
        distill = (kl * weights).sum() / count * (t * t)
        if ce is None or label_weight <= 0:
            return distill
        return (1.0 - label_weight) * distill + label_weight * ce

    def fisher_loss(
        self,
        output: torch.Tensor,
        reference: torch.Tensor,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Cross-entropy against next tokens drawn from the reference's distribution at every counted
        position (see :meth:`Task.fisher_loss`)."""
        weights = _next_token_weights(batch.get("attention_mask"), output.shape[:2], output.device)
        probs = torch.softmax(reference.detach().double().reshape(-1, reference.shape[-1]), dim=-1).cpu()
        drawn = torch.multinomial(probs, 1, generator=generator).reshape(-1).to(output.device)
        per_token = torch.nn.functional.cross_entropy(
            output.reshape(-1, output.shape[-1]), drawn, reduction="none"
        )
        return (per_token * weights.reshape(-1)).sum() / weights.sum().clamp_min(1.0)

    # ----- evaluation
    # Per-sample summary columns: negative log-likelihood sum, counted positions, KL sum, agreements.
    NLL, COUNT, KL, AGREE = range(4)

    def summarize(self, output: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Per sample: [nll sum, counted positions, 0, counted positions] (the model against itself)."""
        return self._compare(_check_lm_logits(output), None, batch)

    def reference_cache(self, reference: Runner, split: DataSplit) -> ReferenceOutputs:
        """The reference's per-sample summaries and its next-token log-probabilities per batch, or, when those
        exceed ``cache_bytes``, the reference runner itself (run again by ``evaluate``: see the class)."""
        rows, kept = [], []
        fits = None
        for batch in split.numpy_batches():
            logits = _check_lm_logits(np.asarray(reference(batch)))
            if fits is None:  # judged on the first batch (later ones are padded to their own longest)
                fits = len(split) * logits.shape[1] * logits.shape[2] * 4 <= self.cache_bytes
            rows.append(self._compare(logits, None, batch))
            if fits:
                kept.append(_log_softmax(logits))
        return ReferenceOutputs(
            task=self.name, values=np.concatenate(rows, axis=0), n_samples=len(split),
            detail=kept if fits else reference,
        )

    def evaluate(
        self,
        candidate: Runner,
        reference: Runner | None,
        split: DataSplit,
        *,
        reference_outputs: ReferenceOutputs | None = None,
    ) -> dict[str, float]:
        """Run the candidate batch by batch, comparing each batch with the reference's log-probs (cached, or
        recomputed when the cache would not fit)."""
        if reference_outputs is None and reference is not None:
            reference_outputs = self.reference_cache(reference, split)
        detail = None
        if reference_outputs is not None:
            if reference_outputs.task != self.name or reference_outputs.n_samples != len(split):
                raise ValueError(
                    f"reference outputs are for task {reference_outputs.task!r} with "
                    f"{reference_outputs.n_samples} samples, not {self.name!r} with {len(split)}"
                )
            detail = reference_outputs.detail
            if not callable(detail) and (not isinstance(detail, list) or len(detail) != len(split.batches)):
                raise ValueError("language-model reference outputs need the reference's per-batch log-probs")
        rows = []
        for i, batch in enumerate(split.numpy_batches()):
            logits = _check_lm_logits(np.asarray(candidate(batch)))
            if logits.shape[0] != _batch_len(batch):
                raise ValueError(f"runner returned {logits.shape[0]} rows for a batch of {_batch_len(batch)}")
            ref_logp = None
            if detail is not None:
                ref_logp = _log_softmax(_check_lm_logits(np.asarray(detail(batch)))) if callable(detail) else detail[i]
            rows.append(self._compare(logits, ref_logp, batch))
        ref_values = None if reference_outputs is None else reference_outputs.values
        return self.metrics(np.concatenate(rows, axis=0), ref_values, split)

    def _compare(self, logits: np.ndarray, ref_logp: np.ndarray | None, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Summary rows of one batch ([nll, count, kl, agreements] per sample), ``chunk`` samples at a time."""
        if ref_logp is not None and ref_logp.shape != logits.shape:
            raise ValueError(f"candidate logits {logits.shape} do not match the reference's {ref_logp.shape}")
        out = np.zeros((logits.shape[0], 4), dtype=np.float64)
        for start in range(0, logits.shape[0], self.chunk):
            part = slice(start, start + self.chunk)
            sub = {k: v[part] for k, v in batch.items()}
            logp = _log_softmax(logits[part])
            row = _summary(logp, sub)
            if ref_logp is not None:
                ref = ref_logp[part]
                weights = _next_token_weights_np(sub.get("attention_mask"), logp.shape[:2])
                # float32 rounding can leave a tiny negative sum where the distributions agree; KL is >= 0
                kl = np.maximum(_kl_terms(ref, logp).sum(axis=-1, dtype=np.float64), 0.0)
                row[:, self.KL] = (kl * weights).sum(axis=1)
                row[:, self.AGREE] = ((logp.argmax(axis=-1) == ref.argmax(axis=-1)) * weights).sum(axis=1)
            out[part] = row
        return out

    def metrics(
        self, candidate: np.ndarray, reference: np.ndarray | None, split: DataSplit
    ) -> dict[str, float]:
        count = float(candidate[:, self.COUNT].sum())
        if count == 0:
            raise ModelpressError(
                "the evaluation text has no next token to predict (every sample is one token or less)",
                "give longer sentences: --data text:FILE",
            )
        out = {"perplexity": _perplexity(candidate)}
        if reference is not None:
            out = {
                "next_token_kl": float(candidate[:, self.KL].sum() / count),
                "top1_agreement": float(candidate[:, self.AGREE].sum() / count),
                **out,
                "reference_perplexity": _perplexity(reference),
            }
        return out


def _kl_terms(ref_logp: np.ndarray, cand_logp: np.ndarray) -> np.ndarray:
    p = np.exp(ref_logp)
    return np.where(p > 0, p * (ref_logp - cand_logp), np.float32(0.0))


def _check_lm_logits(output: np.ndarray) -> np.ndarray:
    if output.ndim != 3:
        raise ValueError(f"a language model's logits have shape [batch, sequence, vocabulary], got {output.shape}")
    return output


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the vocabulary in float32 (float64 would double the memory of a large vocabulary)."""
    x = logits.astype(np.float32)  # a copy: the caller's logits stay as they are
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def _next_token_weights_np(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """1.0 at positions t < S-1 whose token and next token are both real (see LanguageModelTask)."""
    b, s = int(shape[0]), int(shape[1])
    out = np.zeros((b, s), dtype=np.float64)
    if mask is None or tuple(mask.shape) != (b, s):
        out[:, :-1] = 1.0
    else:
        real = np.asarray(mask) > 0
        out[:, :-1] = real[:, :-1] & real[:, 1:]
    return out


def _next_token_weights(mask: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """:func:`_next_token_weights_np` on torch tensors (float32)."""
    b, s = int(shape[0]), int(shape[1])
    out = torch.zeros((b, s), dtype=torch.float32, device=device)
    if mask is None or tuple(mask.shape) != (b, s):
        out[:, :-1] = 1.0
    else:
        real = mask.to(device) > 0
        out[:, :-1] = (real[:, :-1] & real[:, 1:]).float()
    return out


def _summary(logp: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
    """[nll sum, counted positions, KL sum 0, agreements = counted positions] per sample."""
    weights = _next_token_weights_np(batch.get("attention_mask"), logp.shape[:2])
    count = weights.sum(axis=1)
    return np.stack([_nll_sums(logp, batch, weights), count, np.zeros_like(count), count], axis=1)


def _nll_sums(logp: np.ndarray, batch: dict[str, np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Per sample: the summed negative log-likelihood of the actual next tokens at counted positions."""
    ids = batch.get("input_ids")
    if ids is None or tuple(ids.shape) != logp.shape[:2]:
        raise ModelpressError(
            "perplexity needs the input_ids the logits predict (shape [batch, sequence])",
            "give text data (--data text:FILE, or tensors:FILE.npz with input_ids)",
        )
    nxt = np.clip(np.asarray(ids)[:, 1:].astype(np.intp), 0, logp.shape[-1] - 1)
    picked = np.take_along_axis(logp[:, :-1], nxt[..., None], axis=-1)[..., 0]
    return -(picked * weights[:, :-1]).sum(axis=1)


def _perplexity(summary: np.ndarray) -> float:
    count = float(summary[:, LanguageModelTask.COUNT].sum())
    return float(np.exp(summary[:, LanguageModelTask.NLL].sum() / max(count, 1.0)))


EMBEDDING_LOSSES = ("pooled", "tokens", "pooled+tokens")
"""The named distillation losses of :meth:`EmbeddingTask.distillation`."""


def _token_weights(mask: torch.Tensor | None, output: torch.Tensor) -> torch.Tensor:
    """1.0 at the tokens the attention mask keeps (every token without a mask), shape [B, S]."""
    if mask is None or tuple(mask.shape) != tuple(output.shape[:2]):
        return torch.ones(output.shape[:2], dtype=output.dtype, device=output.device)
    return (mask.to(output.device) > 0).to(output.dtype)


TASKS: dict[str, type[Task]] = {"embedding": EmbeddingTask, "classification": ClassificationTask,
                             "language-model": LanguageModelTask}


def task_for(kind: str) -> Task:
    """The task called ``kind`` ("embedding", "classification" or "language-model")."""
    try:
        return TASKS[kind]()
    except KeyError:
        raise ModelpressError(f"unknown task {kind!r}", f"choose one of: {', '.join(TASKS)}") from None


def infer_task(input_spec: InputSpec, module: torch.nn.Module) -> Task:
    """Guess the task from the class name and one forward pass: causal language models (HF
    ``*ForCausalLM`` / ``*LMHeadModel``, or vocabulary-wide logits [B, S, V] on text) -> language model,
    other logits -> classification, hidden states -> embedding.

    Falls back to the output rank ([B, S, H] -> embedding, [B, C] -> classification), and when the model
    cannot run on sample inputs, to the input kind (text -> embedding, otherwise classification).
    """
    cls = type(module).__name__
    if "Classification" in cls:
        return ClassificationTask()
    if input_spec.kind == "text" and (cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel")):
        return LanguageModelTask()
    try:
        sample = input_spec.make(batch=2, seq_len=8)
        raw = _raw_forward(module, input_spec.names, sample)
    except Exception:  # noqa: BLE001 - any failure: decide from the input kind
        return EmbeddingTask() if input_spec.kind == "text" else ClassificationTask()
    logits = raw.get("logits") if isinstance(raw, dict) else getattr(raw, "logits", None)
    if _vocabulary_logits(logits, input_spec) and "MaskedLM" not in cls:
        return LanguageModelTask()
    for key, task in (("logits", ClassificationTask), ("last_hidden_state", EmbeddingTask)):
        value = raw.get(key) if isinstance(raw, dict) else getattr(raw, key, None)
        if isinstance(value, torch.Tensor):
            return task()
    out = torch_runner(module, input_spec.names)(sample)
    if out.ndim == 3 and _vocabulary_logits(torch.from_numpy(out), input_spec) and "MaskedLM" not in cls:
        return LanguageModelTask()
    if out.ndim == 3:
        return EmbeddingTask()
    if out.ndim == 2 and input_spec.kind == "text" and out.shape[1] > 64:
        return EmbeddingTask()  # a pooled sentence embedding, not a handful of class logits
    return ClassificationTask()


def _vocabulary_logits(value: Any, input_spec: InputSpec) -> bool:
    """Whether ``value`` is [B, S, V] with V at least the text vocabulary: next-token logits."""
    return (
        isinstance(value, torch.Tensor)
        and value.ndim == 3
        and input_spec.kind == "text"
        and bool(input_spec.vocab_size)
        and int(value.shape[-1]) >= int(input_spec.vocab_size)
    )


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
