"""The one training loop of modelpress: distillation from the original model (or labels), AdamW, a step
and/or time budget, gradient clipping, seeded batch order, and checkpoints to resume from.

Recovery after pruning, super-network training and fusion fine-tuning all train through :func:`train`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.data.sources import DataSplit, TaskData
from modelpress.data.tasks import Task
from modelpress.errors import ModelpressError
from modelpress.graph.inputs import primary_output
from modelpress.graph.run import call_module
from modelpress.progress import QUIET, Reporter
from modelpress.train.batches import Samples
from modelpress.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from modelpress.train.config import TrainConfig
from modelpress.train.distill import HiddenMaps, capture, hidden_loss, token_weights
from modelpress.train.schedule import make_scheduler
from modelpress.train.teacher import CachedTeacher, LiveTeacher, Targets

__all__ = ["Augment", "TrainResult", "train"]

Augment = Callable[[dict[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]]
"""Changes a training batch (random jitter), drawing randomness only from the given generator."""

_GLOBAL_SEED_OFFSET = 0x9E3779B9  # the global RNG (dropout) gets its own stream, apart from the batch order


@dataclass
class TrainResult:
    """What a training run did. ``steps``, ``seconds`` and ``losses`` count the whole training (runs before a
    resume included); ``mean_loss`` is over this run's steps (NaN when it ran none)."""

    steps: int
    seconds: float
    final_loss: float
    mean_loss: float
    losses: list[tuple[int, float]] = field(
        default_factory=list
    )  # (step, mean loss since the previous entry),
    # every log_every steps and at the end
    resumed: bool = False
    stopped_by: str = "steps"  # "steps" or "seconds"
    steps_this_run: int = 0
    checkpoint: Path | None = None


def train(
    student: nn.Module,
    data: DataSplit | TaskData,
    *,
    task: Task,
    teacher: nn.Module | None = None,
    config: TrainConfig,
    reporter: Reporter = QUIET,
    input_names: list[str] | None = None,
    resume: bool = False,
    augment: Augment | None = None,
    hidden: list[tuple[str, str]] | None = None,
) -> TrainResult:
    """Train ``student`` in place on ``data`` (a split, or a TaskData's ``train`` split) and report how.

    The loss is ``task.loss``: distillation from ``teacher`` (the original, unpruned model, run in eval mode
    without gradients) mixed with the data's labels by ``config.label_weight``, or labels alone when there is
    no teacher. AdamW over the student's trainable parameters, the learning-rate schedule of ``config``, the
    gradients' global norm clipped to ``config.grad_clip``. Samples are reshuffled every epoch by a generator
    seeded with ``config.seed``; the global RNG (dropout) is seeded too and the caller's RNG state restored
    afterwards, so the same inputs give bit-identical weights on the same machine and thread count.
    ``input_names``: the batch keys fed to the models (default: all the data's inputs). ``augment``:
    optional random jitter per batch, drawing from the batch-order generator.

    Hidden-state distillation (``config.hidden_weight`` > 0): ``hidden`` pairs (student module path, teacher
    module path), usually :func:`modelpress.train.hidden_pairs` of the two graphs' blocks; the loss adds
    ``hidden_weight`` times the normalized MSE of the pairs' outputs (:mod:`modelpress.train.distill`), with a
    learned linear map per pair whose widths differ (trained with the student, started by least squares on the
    first samples, saved in checkpoints). ``config.teacher_cache``: the teacher's targets are computed once per
    sample and reused every epoch (:mod:`modelpress.train.teacher`; not with ``augment``, whose batches change).

    With ``config.checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` steps, at the end,
    and when Ctrl-C (SIGINT, deferred to the end of the running step) stops the training, before the
    KeyboardInterrupt propagates. ``resume=True`` continues from that directory's checkpoint (when there is
    one, else starts afresh); the checkpoint must come from the same recipe (config apart from budget,
    checkpointing and logging), task loss, student and data. An uninterrupted run and a run stopped and
    resumed end with identical weights. The student is left in the training mode it came in.
    """
    split = _train_split(data)
    if resume and config.checkpoint_dir is None:
        raise ModelpressError(
            "resume=True needs config.checkpoint_dir", "set checkpoint_dir in the TrainConfig"
        )
    samples = Samples(split)
    if config.label_weight > 0 and samples.labels is None:
        raise ModelpressError(
            f"label_weight is {config.label_weight}, but the training data has no labels",
            "set label_weight=0 to distil from the teacher alone, or give labelled data",
        )
    names = list(input_names) if input_names is not None else [k for k in samples.tensors]
    missing = [n for n in names if n not in samples.tensors]
    if missing:
        raise ModelpressError(
            f"the training data lacks the inputs {missing} (it has {sorted(samples.tensors)})",
            "give data with the model's inputs, or pass input_names",
        )
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ModelpressError("the student has no trainable parameters", "unfreeze some (requires_grad=True)")
    device = params[0].device
    pairs = list(hidden or []) if config.hidden_weight > 0 else []
    if config.hidden_weight > 0 and (teacher is None or not pairs):
        raise ModelpressError(
            f"hidden_weight is {config.hidden_weight}, but there is no "
            + ("teacher" if teacher is None else "pair of student and teacher blocks (hidden=)") + " to match",
            "give teacher= and hidden= (train.hidden_pairs(student_graph, teacher_graph)), or set hidden_weight=0",
        )
    live = None if teacher is None else LiveTeacher(teacher, names, [t for _, t in pairs], device)

    with _forked_rng(device), _InterruptAtStepEnd() as interrupt, _modes(student, teacher, config.dropout):
        maps = _hidden_maps(student, live, pairs, samples, names, device) if pairs else None
        if maps is not None:
            params = params + list(maps.parameters())
        torch.manual_seed(config.seed + _GLOBAL_SEED_OFFSET)
        generator = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = make_scheduler(optimizer, config)
        state = TrainState()
        resumed = False
        if resume:
            checkpoint = load_checkpoint(config.checkpoint_dir)
            if checkpoint is not None:
                _check_resumable(checkpoint.meta, config, len(samples), _task_meta(task))
                checkpoint.restore(student, optimizer, scheduler, generator, maps=maps)
                state = checkpoint.state()
                resumed = True
                reporter.log(f"resuming training at step {state.step} from {checkpoint.path}")
        loop = _Loop(student, live, task, config, samples, names, device, augment, maps, pairs, reporter)
        with capture(student, [s for s, _ in pairs]) as found:
            loop.student_hidden = found
            return loop.run(state, optimizer, scheduler, generator, interrupt, reporter, resumed)


_MAP_SAMPLES = 64  # samples the hidden maps' least-squares start is fitted on (the first, by index)


def _hidden_maps(
    student: nn.Module,
    live: LiveTeacher | None,
    pairs: list[tuple[str, str]],
    samples: Samples,
    names: list[str],
    device: torch.device,
) -> HiddenMaps:
    """The maps of the pairs, sized (and started by least squares) on the first samples: the student runs in
    eval mode without gradients, so neither its state nor any RNG moves."""
    assert live is not None
    batch = samples.batch(torch.arange(min(len(samples), _MAP_SAMPLES)))
    batch = {k: v.to(device) for k, v in batch.items()}
    was = student.training
    student.eval()
    try:
        with torch.no_grad(), capture(student, [s for s, _ in pairs]) as found:
            call_module(student, batch, names)
            student_hidden = [found[s] for s, _ in pairs]
    finally:
        student.train(was)
    _, teacher_hidden = live(batch)
    live.calls = live.samples_run = 0
    maps = HiddenMaps(pairs, student_hidden, teacher_hidden).to(device)
    maps.fit(student_hidden, teacher_hidden, token_weights(batch, student_hidden[0]))
    return maps


class _Loop:
    """One run of the loop over a prepared student, teacher and data (the state lives in a TrainState)."""

    def __init__(
        self,
        student: nn.Module,
        live: LiveTeacher | None,
        task: Task,
        config: TrainConfig,
        samples: Samples,
        names: list[str],
        device: torch.device,
        augment: Augment | None,
        maps: HiddenMaps | None,
        pairs: list[tuple[str, str]],
        reporter: Reporter,
    ) -> None:
        self.student, self.live, self.task, self.config = student, live, task, config
        self.samples, self.names, self.device, self.augment = samples, names, device, augment
        self.maps, self.pairs, self.reporter = maps, pairs, reporter
        self.student_hidden: dict[str, torch.Tensor] = {}
        self.cache: CachedTeacher | None = None
        self.cache_tried = False

    def _teacher_cache(self, state: TrainState) -> CachedTeacher | None:
        """The cache, built on first use once the first epoch's order is known (None: run the teacher live)."""
        if self.cache is None and not self.cache_tried:
            self.cache_tried = True
            config = self.config
            if config.teacher_cache == "off" or self.live is None:
                return None
            if self.augment is not None or state.first_order is None:
                why = "the batches are augmented" if self.augment is not None else "the checkpoint predates it"
                self.reporter.log(f"teacher cache off: {why}")
                return None
            self.cache = CachedTeacher(
                self.live, self.samples, state.first_order, config.batch_size,
                dtype=config.teacher_cache, budget_bytes=int(config.teacher_cache_mb * 2**20),
            )
            self.reporter.log(self.cache.describe())
        return self.cache

    def run(
        self,
        state: TrainState,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        generator: torch.Generator,
        interrupt: _InterruptAtStepEnd,
        reporter: Reporter,
        resumed: bool,
    ) -> TrainResult:
        config = self.config
        limit = config.steps if config.steps is not None else config.horizon
        start_step, start_seconds = state.step, state.seconds
        run_sum, run_count = 0.0, 0
        stopped_by = "steps"
        path: Path | None = None

        def save() -> Path | None:
            if config.checkpoint_dir is None:
                return None
            return save_checkpoint(
                config.checkpoint_dir,
                student=self.student,
                optimizer=optimizer,
                scheduler=scheduler,
                generator=generator,
                state=state,
                maps=self.maps,
                extra={"recipe": config.recipe(), "samples": len(self.samples), "task": _task_meta(self.task)},
            )

        in_step = False
        clock = time.perf_counter()
        total = None if limit is None else max(0, limit - state.step)
        steps = reporter.track(self._step_numbers(state, limit), "training", total=total)
        try:
            for _ in steps:
                if config.seconds is not None and state.seconds >= config.seconds:
                    stopped_by = "seconds"
                    break
                in_step = True
                loss = self._step(state, optimizer, scheduler, generator)
                state.step += 1
                now = time.perf_counter()
                state.seconds += now - clock
                clock = now
                in_step = False
                state.last_loss = loss
                run_sum, run_count = run_sum + loss, run_count + 1
                window_sum, window_count = state.window[0] + loss, state.window[1] + 1
                state.window = (window_sum, window_count)
                if state.step % config.log_every == 0:
                    state.losses.append((state.step, window_sum / window_count))
                    state.window = (0.0, 0)
                if state.step % config.checkpoint_every == 0:
                    path = save()
                if interrupt.pending:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if not in_step:  # a step cut short leaves partial updates: keep the last periodic checkpoint
                path = save()
                if path is not None:
                    reporter.log(f"training interrupted at step {state.step}; resume from {path}")
            raise
        path = save() or path
        losses = list(state.losses)
        if state.window[1]:  # the steps since the last log; the checkpoint keeps them open for a resume
            losses.append((state.step, state.window[0] / state.window[1]))
        ran = state.step - start_step
        reporter.log(
            f"trained {ran} steps in {state.seconds - start_seconds:.1f} s"
            + (f", loss {state.last_loss:.4g}" if state.last_loss is not None else "")
        )
        return TrainResult(
            steps=state.step,
            seconds=state.seconds,
            final_loss=math.nan if state.last_loss is None else state.last_loss,
            mean_loss=run_sum / run_count if run_count else math.nan,
            losses=losses,
            resumed=resumed,
            stopped_by=stopped_by,
            steps_this_run=ran,
            checkpoint=path,
        )

    @staticmethod
    def _step_numbers(state: TrainState, limit: int | None) -> Iterator[int]:
        while limit is None or state.step < limit:
            yield state.step

    def _step(
        self,
        state: TrainState,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        generator: torch.Generator,
    ) -> float:
        """One optimizer step on the next batch; returns its loss."""
        n, size = len(self.samples), self.config.batch_size
        if state.order is None or state.position >= n:
            state.order = self.samples.epoch_order(generator, size, self.config.group_by_length)
            state.position = 0
            state.epoch += 1
            if state.epoch == 1:
                state.first_order = state.order
        index = state.order[state.position : state.position + size]
        state.position = min(state.position + size, n)
        batch = self.samples.batch(index)
        if self.augment is not None:
            batch = self.augment(batch, generator)
        teacher_out, teacher_hidden = self._targets(state, index, batch)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        student_out = primary_output(call_module(self.student, batch, self.names))
        loss = self.task.loss(
            student_out,
            teacher_out,
            batch,
            temperature=self.config.temperature,
            label_weight=self.config.label_weight,
            label_smoothing=self.config.label_smoothing,
        )
        if self.maps is not None:
            student_hidden = [self.student_hidden[s] for s, _ in self.pairs]
            loss = loss + self.config.hidden_weight * hidden_loss(self.maps, student_hidden, teacher_hidden, batch)
        if not torch.isfinite(loss):
            raise ModelpressError(
                f"the training loss became {float(loss)} at step {state.step}",
                "lower lr, or set grad_clip",
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], self.config.grad_clip
            )
        optimizer.step()
        scheduler.step()
        return float(loss.detach())

    def _targets(
        self, state: TrainState, index: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The teacher's output and matched hidden states for this batch (cached or live; none without one)."""
        if self.live is None:
            return None, []
        cache = self._teacher_cache(state)
        targets: Targets = cache(index, batch) if cache is not None else self.live(batch)
        return targets


def _train_split(data: DataSplit | TaskData) -> DataSplit:
    if isinstance(data, TaskData):
        return data.train
    if isinstance(data, DataSplit):
        return data
    raise ModelpressError(
        f"cannot train on a {type(data).__name__}", "pass a DataSplit or a TaskData (its train split is used)"
    )


# recipe fields added after checkpoints were first written, with the value older checkpoints trained with
_ADDED_FIELDS: dict[str, Any] = {"dropout": True, "hidden_weight": 0.0, "group_by_length": False}


def _task_meta(task: Task) -> dict[str, Any]:
    """What of the task a resumed training must share: its name and loss settings."""
    return {"name": task.name or type(task).__name__, "loss": task.loss_settings()}


def _check_resumable(meta: dict[str, Any], config: TrainConfig, n_samples: int, task: dict[str, Any]) -> None:
    saved_task = meta.get("task")
    if saved_task is not None and saved_task != task:
        raise ModelpressError(
            f"the checkpoint was trained with another loss ({saved_task} -> {task})",
            "resume with the same task and loss settings, or use another checkpoint_dir",
        )
    saved, now = {**_ADDED_FIELDS, **meta.get("recipe", {})}, config.recipe()
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise ModelpressError(
            f"the checkpoint was written by another training recipe ({changes})",
            "resume with the same settings (only steps, seconds, checkpoint_every and log_every may change), "
            "or use another checkpoint_dir",
        )
    if meta.get("samples") != n_samples:
        raise ModelpressError(
            f"the checkpoint was trained on {meta.get('samples')} samples, this data has {n_samples}",
            "resume on the same data",
        )


@contextlib.contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """Run with the global RNG forked: seeding it inside leaves the caller's RNG untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def _modes(student: nn.Module, teacher: nn.Module | None, dropout: bool = True) -> Iterator[None]:
    """Student in training mode (eval mode when ``dropout`` is False) and teacher in eval mode for the
    duration; their modes restored after."""
    was = student.training, None if teacher is None else teacher.training
    student.train(dropout)
    if teacher is not None:
        teacher.eval()
    try:
        yield
    finally:
        student.train(was[0])
        if teacher is not None:
            teacher.train(bool(was[1]))


class _InterruptAtStepEnd:
    """Defers Ctrl-C (SIGINT) to the end of the running step, so a checkpoint never holds half a step.

    Active only in the main thread and when SIGINT has Python's default handler; a second Ctrl-C while one
    is pending interrupts at once (for a step that hangs).
    """

    def __init__(self) -> None:
        self.pending = False
        self._previous: Any = None

    def __enter__(self) -> _InterruptAtStepEnd:
        if threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True
