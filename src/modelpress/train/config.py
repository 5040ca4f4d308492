"""TrainConfig: the budget, optimizer, schedule, distillation and checkpoint settings of one training run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DEFAULT_HIDDEN_WEIGHT", "RECIPE_FIELDS", "TrainConfig"]

# recovery's hidden-state weight. First study: of 0, 0.1, 0.3 and 1 (150 steps, benchmarks/recovery.py --study distill),
# 1 kept the best held-out mean and min cosine on MiniLM at 0.55 of its parameters and the best logit cosine on the
# digits ViT. Session 14, larger weights, MiniLM hessian-pruned to 0.65 of its predicted latency (0.919 untrained),
# held-out mean cosine after 1000 steps: 0.3 -> 0.948, 1 -> 0.950, 3 -> 0.953, 10 -> 0.954; after 150 steps:
# 1 -> 0.929, 10 -> 0.931. Digits ViT at 0.25 of its parameters, 300 steps: logit cosine 0.988 (1), 0.989 (3),
# 0.989 (10), accuracy 0.975, 0.975, 0.970 (one of 200 digits). So 10.
DEFAULT_HIDDEN_WEIGHT = 10.0


class TrainConfig(BaseModel):
    """Settings of :func:`modelpress.train.train`; unknown keys are errors, values are checked.

    Budget: ``steps`` and/or ``seconds``; training stops at whichever comes first (seconds count the whole
    training, runs before a resume included). Learning rate: AdamW at ``lr`` with ``weight_decay``,
    ``schedule``:

    - ``"cosine"`` (default): linear warm-up over ``warmup_steps``, then cosine decay towards 0 at
      ``schedule_steps``;
    - ``"constant"``: linear warm-up, then constant;
    - ``"one_cycle"``: torch's OneCycleLR (cosine warm-up from lr/25 over ``warmup_steps``, cosine decay
      to lr/25e4 at ``schedule_steps``, AdamW's beta1 cycled 0.95 -> 0.85 -> 0.95); the digits zoo's recipe.

    ``schedule_steps`` (the schedule's length) defaults to ``steps``; set it when a training is run in parts
    (``steps=k`` now, the rest after a resume) so that every part follows the one schedule.
    Distillation: ``temperature`` softens the logits; ``label_weight`` mixes the labels' cross-entropy into
    the loss when the data has labels (0: pure distillation; without a teacher only labels are used).
    ``dropout=False`` trains the student in eval mode: no dropout and frozen BatchNorm statistics, the usual
    choice when recovering a pruned model towards its original (the student then matches the teacher's mode).
    ``group_by_length`` (text): each batch is drawn from samples of similar length, so it pads to little more
    than its own samples (:meth:`modelpress.train.batches.Samples.epoch_order`); the order stays seeded.
    ``hidden_weight`` > 0 adds hidden-state distillation (the normalized MSE of matched block outputs, see
    :mod:`modelpress.train.distill`; :data:`DEFAULT_HIDDEN_WEIGHT` is what recovery uses).
    ``teacher_cache``: the teacher's targets are computed once per training sample and reused every epoch, in
    memory, at most ``teacher_cache_mb`` MiB (the samples beyond run live); ``auto`` stores float32 when all
    samples fit the budget in float32, else float16; ``off`` runs the teacher every step. A float32 cache
    changes nothing but rounding, so it is no part of the recipe a resume must match.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int | None = Field(default=None, ge=1)
    seconds: float | None = Field(default=None, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    schedule: Literal["cosine", "constant", "one_cycle"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    schedule_steps: int | None = Field(default=None, ge=1)
    grad_clip: float | None = Field(default=1.0, gt=0)  # max global gradient norm; None: no clipping
    batch_size: int = Field(default=16, ge=1)
    group_by_length: bool = False  # text: batches of similar lengths (less padding; Samples.epoch_order)
    seed: int = Field(default=0, ge=0)
    temperature: float = Field(default=1.0, gt=0)
    label_weight: float = Field(default=0.0, ge=0, le=1)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    dropout: bool = True  # False: the student trains in eval mode (no dropout, BatchNorm statistics frozen)
    hidden_weight: float = Field(default=0.0, ge=0)  # weight of the hidden-state loss (needs train(hidden=...))
    teacher_cache: Literal["auto", "float32", "float16", "off"] = "auto"
    teacher_cache_mb: float = Field(default=1024.0, gt=0)
    checkpoint_dir: Path | None = None
    checkpoint_every: int = Field(default=100, ge=1)
    log_every: int = Field(default=10, ge=1)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.steps is None and self.seconds is None:
            raise ValueError("give a budget: steps, seconds or both")
        horizon = self.horizon
        if horizon is None:
            if self.schedule != "constant":
                raise ValueError(
                    f"the {self.schedule} schedule needs its length: give steps or schedule_steps "
                    "(or use schedule='constant' with a seconds-only budget)"
                )
            return self
        if self.schedule != "constant" and self.steps is not None and self.steps > horizon:
            raise ValueError(f"steps ({self.steps}) run past the schedule's end (schedule_steps={horizon})")
        if self.warmup_steps >= horizon and self.schedule != "constant":
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be below the schedule's {horizon} steps"
            )
        if self.schedule == "one_cycle" and not 2 <= self.warmup_steps <= horizon - 2:
            raise ValueError("the one_cycle schedule needs 2 <= warmup_steps <= schedule_steps - 2")
        return self

    @property
    def horizon(self) -> int | None:
        """The schedule's length in steps (``schedule_steps``, else ``steps``); None when unbounded."""
        return self.schedule_steps if self.schedule_steps is not None else self.steps

    def recipe(self) -> dict[str, object]:
        """The settings a resumed run must share with the run it continues (everything but the budget,
        checkpointing and logging), as JSON values."""
        out = self.model_dump(mode="json", include=set(RECIPE_FIELDS))
        out["schedule_steps"] = None if self.schedule == "constant" else self.horizon  # constant: no length
        return out


RECIPE_FIELDS = (
    "lr",
    "weight_decay",
    "schedule",
    "warmup_steps",
    "schedule_steps",
    "grad_clip",
    "batch_size",
    "group_by_length",
    "seed",
    "temperature",
    "label_weight",
    "label_smoothing",
    "dropout",
    "hidden_weight",
)
