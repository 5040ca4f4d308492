"""The ``recover`` pass: label-free recovery training of a compressed graph towards the original model.

It runs :func:`modelpress.train.train` (the one training loop) with the original model (``ctx.reference``)
as teacher: KL on logits for classifiers, cosine (and optionally MSE) of pooled embeddings or per-token
hidden states for encoders, next-token KL for language models; labels only when ``label_weight`` > 0.
Beside the output, every block of the compressed model is matched to the original block it descends from
(``hidden_weight``: normalized MSE of their outputs, a learned map where the residual width was pruned), and
the original's targets are computed once per training sample and reused every epoch (``teacher_cache``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from modelpress.data.sources import DataSplit
from modelpress.data.tasks import EmbeddingTask, Task
from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.passes import Context, GraphPass, PassConfig, PassResult, register
from modelpress.train import DEFAULT_HIDDEN_WEIGHT, TrainConfig, TrainResult, hidden_pairs, train

__all__ = ["Recover", "RecoverConfig"]

# settings that change neither the trained weights nor where a run resumes from
_NOT_FINGERPRINTED = {"checkpoint_every", "checkpoint_dir", "resume", "evaluate"}


class RecoverConfig(PassConfig):
    """Budget (``steps`` and/or ``minutes``, whichever ends first), AdamW (``lr``, ``weight_decay``,
    ``warmup`` steps of linear warm-up, then cosine decay over ``steps``, or a constant rate when only
    ``minutes`` are given), ``grad_clip``, ``batch_size``, ``group_by_length`` (text: each batch of sentences of
    similar length, so less padding); distillation: ``temperature`` (logits),
    ``label_weight`` (0: label-free; > 0 mixes in the labels' cross-entropy, the data must have labels),
    ``loss`` and ``mse_weight`` for encoders (see ``EmbeddingTask.distillation``), ``dropout`` (False: the
    student trains in eval mode, like the teacher). Checkpoints every ``checkpoint_every`` steps into
    ``checkpoint_dir`` (default: the run's checkpoint folder, one subfolder per student and settings);
    ``resume`` continues from one there. ``evaluate``: score the held-out split before and after (torch).
    ``hidden_weight``: weight of hidden-state distillation (every block of the student matched to the original
    block it descends from, normalized MSE, a learned map where widths differ; 0: outputs only).
    ``teacher_cache``/``teacher_cache_mb``: the teacher's targets computed once per sample and reused every
    epoch, in memory up to the budget (see :class:`modelpress.train.TrainConfig`)."""

    steps: int | None = Field(default=None, ge=1)
    minutes: float | None = Field(default=None, gt=0)
    lr: float = Field(default=3e-4, gt=0)  # the best of 1e-4, 3e-4, 1e-3 for MiniLM, 3 minutes (benchmarks/recovery.py)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup: int | None = Field(default=None, ge=0)  # None: 10% of steps, at most 100 (20 for minutes alone)
    batch_size: int = Field(default=32, ge=1)
    group_by_length: bool = False
    grad_clip: float | None = Field(default=1.0, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    label_weight: float = Field(default=0.0, ge=0, le=1)
    loss: Literal["pooled", "tokens", "pooled+tokens"] = "pooled"
    mse_weight: float = Field(default=0.0, ge=0)
    dropout: bool = False
    hidden_weight: float = Field(default=DEFAULT_HIDDEN_WEIGHT, ge=0)
    teacher_cache: Literal["auto", "float32", "float16", "off"] = "auto"
    teacher_cache_mb: float = Field(default=1024.0, gt=0)
    checkpoint_every: int = Field(default=50, ge=1)
    checkpoint_dir: Path | None = None
    resume: bool = True
    evaluate: bool = False

    @model_validator(mode="after")
    def _check(self) -> RecoverConfig:
        if self.steps is None and self.minutes is None:
            raise ValueError("give a budget: steps, minutes or both")
        if self.steps is not None and self.warmup is not None and self.warmup >= self.steps:
            raise ValueError(f"warmup ({self.warmup}) must be below steps ({self.steps})")
        return self

    def train_config(self, seed: int, checkpoint_dir: Path, hidden: bool = True) -> TrainConfig:
        """The loop's settings: cosine over ``steps`` when given, else a constant rate after warm-up;
        ``hidden=False``: no hidden-state loss (no blocks to match)."""
        if self.warmup is not None:
            warmup = self.warmup
        else:
            warmup = min(100, self.steps // 10) if self.steps is not None else 20
        return TrainConfig(
            steps=self.steps,
            seconds=None if self.minutes is None else self.minutes * 60.0,
            lr=self.lr,
            weight_decay=self.weight_decay,
            schedule="cosine" if self.steps is not None else "constant",
            warmup_steps=warmup,
            grad_clip=self.grad_clip,
            batch_size=self.batch_size,
            group_by_length=self.group_by_length,
            seed=seed,
            temperature=self.temperature,
            label_weight=self.label_weight,
            dropout=self.dropout,
            hidden_weight=self.hidden_weight if hidden else 0.0,
            teacher_cache=self.teacher_cache,
            teacher_cache_mb=self.teacher_cache_mb,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=self.checkpoint_every,
        )


@register
class Recover(GraphPass):
    """Recovery training after pruning: distil the original model (``ctx.reference``) into this graph on the
    train split (the calibration split, with a warning, when there is none), label-free by default.

    Deterministic for a seed (``ctx.seed``) on one machine and thread count; checkpointed, and an interrupted
    run (Ctrl-C) resumes where it stopped, to the same weights as an uninterrupted run.
    """

    name = "recover"
    Config = RecoverConfig

    def apply(self, graph: ModelGraph, ctx: Context) -> PassResult:
        cfg: RecoverConfig = self.config
        if ctx.reference is None:
            raise ModelpressError(
                "recovery distils from the original model, and the context has none",
                "run recover in a recipe (the pipeline sets the original), or set ctx.reference",
            )
        task = _loss_task(ctx.task, cfg)
        split, split_name = _training_data(ctx)
        student = graph.copy()
        teacher = ctx.reference.module
        names = list(graph.input_spec.names)
        folder = cfg.checkpoint_dir or ctx.checkpoint_dir(f"recover-{_fingerprint(student, cfg, ctx.seed, len(split))}")
        pairs = hidden_pairs(student, ctx.reference) if cfg.hidden_weight > 0 else []
        if cfg.hidden_weight > 0 and not pairs:
            ctx.reporter.log("  no blocks to match between the model and the original: distilling outputs only")
        config = cfg.train_config(ctx.seed, Path(folder), hidden=bool(pairs))
        budget = " and ".join(
            x for x in (cfg.steps and f"{cfg.steps} steps", cfg.minutes and f"{cfg.minutes:g} minutes") if x
        )
        rep = ctx.reporter
        rep.log(
            f"  recovering for {budget} on {len(split)} {split_name} samples (batch {cfg.batch_size}, lr {cfg.lr:g}), "
            f"distilling the original model ({_describe(task, cfg)})"
        )
        before = _quality(ctx, student) if cfg.evaluate else None
        try:
            result = train(
                student.module, split, task=task, teacher=teacher, config=config, reporter=rep,
                input_names=names, resume=cfg.resume, hidden=pairs,
            )
        except KeyboardInterrupt:
            rep.log(f"  recovery interrupted; its checkpoint is in {folder}: run the same command again to resume")
            raise
        metrics = _metrics(result, len(split), split_name, cfg)
        metrics["hidden_weight"], metrics["hidden_pairs"] = config.hidden_weight, len(pairs)
        rep.log(
            f"  recovered {result.steps} steps in {result.seconds:.0f} s"
            + (f" (resumed from a checkpoint, {result.steps_this_run} steps now)" if result.resumed else "")
            + f": loss {metrics['loss_start']:.4g} -> {metrics['loss_end']:.4g}"
        )
        if before is not None:
            after = _quality(ctx, student)
            metrics["quality_before"], metrics["quality_after"] = before, after
            rep.log(f"  held-out quality {_short(before)} -> {_short(after)}")
        return PassResult(graph=student, metrics=metrics)


def _loss_task(task: Task | None, cfg: RecoverConfig) -> Task:
    """The task whose loss recovery trains on: the run's, with the encoder loss the config names."""
    if task is None:
        raise ModelpressError("recovery needs the run's task (what the model outputs)", "give the run a task")
    if isinstance(task, EmbeddingTask):
        return EmbeddingTask.distillation(cfg.loss, cfg.mse_weight)
    if cfg.loss != "pooled" or cfg.mse_weight:
        raise ModelpressError(
            f"loss {cfg.loss!r} and mse_weight apply to encoders (embedding task), this model's task is {task.name!r}",
            "leave loss and mse_weight out: classifiers distil logits (KL) and language models next-token KL",
        )
    return task


def _training_data(ctx: Context) -> tuple[DataSplit, str]:
    """The train split, or the calibration split (with a warning) when the data has no train split."""
    if ctx.data is None:
        raise ModelpressError("recovery needs training data and the run has none", "give the run --data")
    try:
        split = ctx.data.train
    except ModelpressError:
        split = None
    if split is not None and len(split):
        return split, "train"
    calibration = ctx.data.calibration
    if calibration is None or not len(calibration):
        raise ModelpressError("recovery needs training data and the run's data has none", "give the run --data")
    ctx.reporter.log(
        f"[yellow]warning[/yellow]: the data ({ctx.data.description}) has no train split; recovering on its "
        f"{len(calibration)} calibration samples"
    )
    return calibration, "calibration"


def _fingerprint(student: ModelGraph, cfg: RecoverConfig, seed: int, n_samples: int) -> str:
    """A short hash of the student's weights and the settings: the checkpoint subfolder, so a rerun of the
    same recipe finds its checkpoint and any other student or setting starts afresh."""
    h = hashlib.blake2b(digest_size=8)
    settings = cfg.model_dump(mode="json", exclude=_NOT_FINGERPRINTED)
    h.update(json.dumps([settings, seed, n_samples], sort_keys=True).encode())
    for key, value in student.module.state_dict().items():
        h.update(key.encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _metrics(result: TrainResult, n_samples: int, split_name: str, cfg: RecoverConfig) -> dict[str, Any]:
    losses = [v for _, v in result.losses]
    return {
        "steps": result.steps,
        "steps_this_run": result.steps_this_run,
        "train_seconds": round(result.seconds, 2),  # training time, runs before a resume included
        "stopped_by": result.stopped_by,
        "resumed": result.resumed,
        "loss_start": losses[0] if losses else math.nan,  # mean over the first logged window (10 steps)
        "loss_end": losses[-1] if losses else math.nan,  # mean over the last window
        "samples": n_samples,
        "data": split_name,
        "label_weight": cfg.label_weight,
    }


def _quality(ctx: Context, graph: ModelGraph) -> dict[str, float]:
    return ctx.evaluate(graph, torch_only=True).metrics


def _short(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _describe(task: Task, cfg: RecoverConfig) -> str:
    hidden = f" + {cfg.hidden_weight:g} x hidden-state MSE" if cfg.hidden_weight else ""
    if isinstance(task, EmbeddingTask):
        return f"{cfg.loss} cosine" + (f" + {cfg.mse_weight:g} x MSE" if cfg.mse_weight else "") + hidden
    what = {"classification": "KL on logits", "language-model": "next-token KL"}.get(task.name, task.name)
    return what + hidden + (f", {cfg.label_weight:g} x label cross-entropy" if cfg.label_weight else ", label-free")
