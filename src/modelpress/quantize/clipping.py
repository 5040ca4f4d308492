"""Learnable per-channel dual clipping of post-norm activations (RepQuant).

Each channel c of a norm's output gets its own lower and upper clipping bound (l_c, u_c), hence its own
scale ``s_c = (u_c - l_c) / (qmax - qmin)`` and zero point ``z_c = qmin - round(l_c / s_c)``. The bounds
start from the calibrated per-channel range and are learned by gradient descent (straight-through
rounding, as in LSQ) to minimise the error of the group's block output: the outputs of the Linear layers
that read the activation, ``sum_k ||W_k (Q(x) - x)||^2 / sum_k ||W_k x||^2``, on calibration tokens.
Clipping is learned per channel, before scale reparameterization turns the scales into one per tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from modelpress.data import probes
from modelpress.quantize.quantizers import round_ste
from modelpress.quantize.reparam import NormGroup


def _prepared_input(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.prepare_input(x)


def collect_group_inputs(
    model: torch.nn.Module,
    groups: Sequence[NormGroup],
    batches: Iterable[Any],
    max_rows: int = 4096,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Float inputs [rows, channels] of each group's consumers (a random subset of tokens, sampled as the
    batches arrive, seeded by ``seed`` group by group); the groups' quantizers pass through meanwhile."""
    names = {id(m): n for n, m in model.named_modules()}
    layers = [names[id(g.consumers[0][1])] for g in groups]
    enabled = [g.quantizer.enabled for g in groups]
    for g in groups:
        g.quantizer.enabled = False
    try:
        stats = probes.collect(
            model, batches, layers, {"inputs"}, transform=_prepared_input, max_rows=max_rows, seed=seed
        )
    finally:
        for g, e in zip(groups, enabled, strict=True):
            g.quantizer.enabled = e
    return [stats[n].inputs for n in layers]


def _fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=1e-8)
    zero = torch.clamp(round_ste(qmin - lo / scale), qmin, qmax)
    q = torch.clamp(round_ste(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def learn_dual_clipping(
    group: NormGroup,
    x: torch.Tensor,
    steps: int = 200,
    lr: float = 5e-3,
    batch_rows: int = 1024,
    seed: int = 0,
) -> dict[str, float]:
    """Learn per-channel (lower, upper) bounds for ``group.quantizer`` on activations ``x`` [rows, C].

    The quantizer must be calibrated per channel (its range is the starting point). Bounds move inward
    only (from the observed range) through ``l = l0 + (u0 - l0) * a``, ``u = u0 - (u0 - l0) * b`` with
    a, b in [0, 0.5). Returns the block-output error before and after.
    """
    q = group.quantizer
    if q.axis is None or q.scale.dim() == 0:
        raise ValueError(f"{group.norm_name}: dual clipping needs a per-channel calibrated quantizer")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lo0 = ((q.qmin - q.zero_point) * q.scale).float()
        hi0 = ((q.qmax - q.zero_point) * q.scale).float()
        width = (hi0 - lo0).clamp(min=1e-8)
        weights = [m.weight.detach().float() for _, m in group.consumers]
    a = torch.zeros_like(lo0, requires_grad=True)
    b = torch.zeros_like(hi0, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=lr)

    def bounds() -> tuple[torch.Tensor, torch.Tensor]:
        return lo0 + width * a.clamp(0, 0.499), hi0 - width * b.clamp(0, 0.499)

    def loss_on(rows: torch.Tensor) -> torch.Tensor:
        lo, hi = bounds()
        err = _fake_quant(rows, lo, hi, q.qmin, q.qmax) - rows
        num = sum(((err @ w.t()) ** 2).sum() for w in weights)
        den = sum(((rows @ w.t()) ** 2).sum() for w in weights)
        return num / den.clamp(min=1e-12)

    with torch.no_grad():
        before = float(loss_on(x))
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch_rows, x.shape[0]),), generator=gen)
        opt.zero_grad()
        loss = loss_on(x[idx])
        loss.backward()
        opt.step()
    with torch.no_grad():
        lo, hi = bounds()
        after = float(loss_on(x))
        if after < before:
            q.set_range(lo, hi)
        else:
            after = before
    return {"block_error_before": before, "block_error_after": after}


def learn_clipping(
    model: torch.nn.Module,
    groups: Sequence[NormGroup],
    batches: Iterable[Any],
    steps: int = 200,
    lr: float = 5e-3,
    reporter: Any = None,
) -> dict[str, dict[str, float]]:
    """Dual clipping for every group (inputs collected in one float pass)."""
    batches = list(batches)
    inputs = collect_group_inputs(model, groups, batches)
    items = list(zip(groups, inputs, strict=True))
    it = items if reporter is None else reporter.track(items, "learning dual clipping", total=len(items))
    return {g.norm_name: learn_dual_clipping(g, x, steps=steps, lr=lr) for g, x in it}
