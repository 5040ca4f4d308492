"""The two rules that combine the K sub-models' logits into one prediction, and how each is fitted."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class ConcatCombiner(nn.Module):
    """Calibrated concatenation: sub-model k's logits ``/ T_k + b_k``, concatenated, in the original class
    order. Takes the K sub-models' logits as K inputs."""

    def __init__(self, subsets: list[list[int]], temperatures: Sequence[float], offsets: Sequence[float]) -> None:
        super().__init__()
        order = [c for s in subsets for c in s]
        scale = torch.cat([torch.full((len(s),), 1.0 / float(t)) for s, t in zip(subsets, temperatures, strict=True)])
        shift = torch.cat([torch.full((len(s),), float(b)) for s, b in zip(subsets, offsets, strict=True)])
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.register_buffer("index", torch.as_tensor(np.argsort(order), dtype=torch.long))

    def forward(self, *logits: torch.Tensor) -> torch.Tensor:
        z = torch.cat(logits, dim=1) * self.scale + self.shift
        return z.index_select(1, self.index)


class FusionHead(nn.Module):
    """ED-ViT's fusion: the K sub-models' logits, concatenated and standardized, through a small MLP (a
    linear layer when ``hidden`` is 0) to logits over all classes."""

    def __init__(self, width: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        else:
            self.net = nn.Linear(width, num_classes)
        self.hidden = hidden

    def forward(self, *logits: torch.Tensor) -> torch.Tensor:
        return self.net((torch.cat(logits, dim=1) - self.mean) / self.std)


def fit_concat(parts: list[torch.Tensor], subsets: list[list[int]], target: torch.Tensor,
                prior: float = 0.01) -> ConcatCombiner:
    """Temperatures and offsets (b_0 = 0) minimizing the NLL of the concatenated softmax (L-BFGS), plus
    ``prior * (sum log(T_k)^2 + sum b_k^2)``: on separable calibration data the NLL alone drives the
    temperatures to 0 (on 64 digits the fit reached T = 0.007 and cost 3 points of held-out accuracy)."""
    k = len(parts)
    log_t = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(max(k - 1, 0), dtype=torch.float64, requires_grad=True)
    order = torch.as_tensor(np.argsort([c for s in subsets for c in s]), dtype=torch.long)
    x = [p.double() for p in parts]
    params = [log_t] + ([bias] if k > 1 else [])
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        shifts = torch.cat([torch.zeros(1, dtype=torch.float64), bias])
        z = torch.cat([x[i] * torch.exp(-log_t[i]) + shifts[i] for i in range(k)], dim=1).index_select(1, order)
        loss = nn.functional.cross_entropy(z, target) + prior * (log_t.square().sum() + bias.square().sum())
        loss.backward()
        return loss

    opt.step(closure)
    temps = torch.exp(log_t.detach()).tolist()
    offsets = [0.0, *bias.detach().tolist()]
    return ConcatCombiner(subsets, temps, offsets)


def fit_fusion(parts: list[torch.Tensor], target: torch.Tensor, num_classes: int, hidden: int, steps: int,
                lr: float, seed: int) -> FusionHead:
    """A FusionHead trained by cross-entropy on ``parts`` (full batch, Adam), deterministic for ``seed``."""
    x = torch.cat(parts, dim=1).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = FusionHead(x.shape[1], num_classes, hidden)
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0).clamp_min(1e-3) if len(x) > 1 else torch.ones(x.shape[1]))
    opt = torch.optim.Adam(head.net.parameters(), lr=lr, weight_decay=1e-4)
    head.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(*parts), target)
        loss.backward()
        opt.step()
    return head.eval()
