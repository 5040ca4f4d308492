"""Learning-rate schedules of the training loop (see :class:`~modelpress.train.config.TrainConfig`)."""

from __future__ import annotations

import math

import torch

from modelpress.train.config import TrainConfig

__all__ = ["lr_factor", "make_scheduler"]


def lr_factor(step: int, config: TrainConfig) -> float:
    """The multiple of ``lr`` used by optimizer step ``step`` (0-based) under the cosine/constant schedules:
    linear warm-up ``(step + 1) / warmup_steps``, then constant, or a cosine from 1 towards 0."""
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    horizon = config.horizon
    if config.schedule == "constant" or horizon is None:
        return 1.0
    progress = (step - warmup) / max(1, horizon - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler for ``config.schedule``; stepped once after every optimizer step."""
    if config.schedule == "one_cycle":
        horizon = config.horizon
        assert horizon is not None  # checked by TrainConfig
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=horizon, pct_start=config.warmup_steps / horizon
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
