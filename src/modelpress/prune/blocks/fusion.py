"""Recycling a removed block into its neighbours (FuseGPT's group-level layer fusion, and a LaCo-style merge).

Learned fusion: for each weight matrix ``W_r`` of the removed block (a Linear, or transformers' Conv1D: any
2-D ``weight``), the layer of the same name in each of the K nearest kept blocks of its container becomes

    W_n' = W_n + (A_n B_n) ⊙ W_r

with ``W_n`` and the injected ``W_r`` frozen and the low-rank coefficient matrix ``A_n B_n`` (rank r) learned.
``A_n`` starts at zero, so before fine-tuning the model is exactly plain removal. The group (the neighbours
and the removed block's place) is fine-tuned by local distillation: the hidden state at the end of the group
is fitted to the one of the model before the removal, on calibration data, label-free. ``fold`` then writes
``W_n'`` into the dense weights: the result has the architecture of plain removal.

Merge (LaCo-style): ``W_n' = W_n + c (W_r - W_n)`` for every parameter of the removed block with a
same-named, same-shaped parameter in a neighbour (``c`` split over the K neighbours), without learning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from modelpress.graph import Block, ModelGraph
from modelpress.prune.blocks.importance import hidden_of


class InjectedWeight(nn.Module):
    """Parametrization ``W -> W + (A @ B) * injected`` with ``injected`` frozen and ``A`` (zeros) and ``B`` learned."""

    def __init__(self, injected: torch.Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        out_f, in_f = injected.shape
        rank = max(1, min(rank, out_f, in_f))
        self.register_buffer("injected", injected.detach().clone())
        self.a = nn.Parameter(torch.zeros(out_f, rank, dtype=injected.dtype))
        self.b = nn.Parameter(torch.randn(rank, in_f, generator=generator, dtype=injected.dtype) / math.sqrt(rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.a @ self.b) * self.injected


def _index(path: str) -> tuple[str, int]:
    container, _, idx = path.rpartition(".")
    return container, int(idx)


def neighbours(blocks: Sequence[Block], removed: str, k: int) -> list[str]:
    """The ``k`` blocks of ``removed``'s container nearest to it (ties: the later block first), in model order."""
    container, r = _index(removed)
    same = [b.path for b in blocks if b.path != removed and b.container == container]
    near = sorted(same, key=lambda p: (abs(_index(p)[1] - r), -_index(p)[1]))[: max(k, 0)]
    return sorted(near, key=lambda p: _index(p)[1])


def _renumbered(path: str, removed: str) -> str:
    container, i = _index(path)
    _, r = _index(removed)
    return f"{container}.{i - 1}" if i > r else path


def matrix_layers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Relative module name -> 2-D ``weight`` of every layer of ``module`` that has one (Linear, Conv1D)."""
    out = {}
    for name, m in module.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2 and not isinstance(m, nn.Embedding):
            out[name] = w
    return out


def _pairs(graph: ModelGraph, removed: str, near: Sequence[str]) -> list[tuple[str, str, torch.Tensor]]:
    """(neighbour path, relative layer name, the removed block's weight) for every layer both have, same shape."""
    src = matrix_layers(graph.module.get_submodule(removed))
    out = []
    for n in near:
        dst = matrix_layers(graph.module.get_submodule(n))
        out += [(n, rel, w.detach().clone()) for rel, w in src.items() if rel in dst and dst[rel].shape == w.shape]
    return out


def remove_with_learnable_fusion(graph: ModelGraph, removed: str, k: int, rank: int,
                                 seed: int) -> tuple[list[str], list[InjectedWeight]]:
    """Remove block ``removed`` from ``graph`` (in place) and inject its weight matrices into its ``k`` nearest
    neighbours as learnable low-rank-weighted parametrizations (zero coefficients: exactly plain removal).
    Returns the neighbours' paths after the removal and the parametrizations (to train, then :func:`fold`)."""
    near = neighbours(graph.blocks, removed, k)
    pairs = _pairs(graph, removed, near)
    graph.remove_block(removed)
    gen = torch.Generator().manual_seed(seed)
    params = []
    for n, rel, w in pairs:
        layer = graph.module.get_submodule(_renumbered(n, removed)).get_submodule(rel) if rel else \
            graph.module.get_submodule(_renumbered(n, removed))
        p = InjectedWeight(w.to(layer.weight.device), rank, gen)
        parametrize.register_parametrization(layer, "weight", p)
        params.append(p)
    return [_renumbered(n, removed) for n in near], params


def fold(graph: ModelGraph) -> int:
    """Write every injected parametrization of ``graph.module`` into its dense weight; returns how many."""
    count = 0
    for m in list(graph.module.modules()):
        if parametrize.is_parametrized(m, "weight"):
            with torch.no_grad():
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            m.weight.requires_grad_(False)
            count += 1
    graph.invalidate()
    return count


def remove_with_merge(graph: ModelGraph, removed: str, k: int, coefficient: float) -> list[str]:
    """LaCo-style: move each neighbour's parameters toward the removed block's by ``coefficient / k``, then remove
    the block (in place). Returns the neighbours' paths after the removal."""
    near = neighbours(graph.blocks, removed, k)
    src = dict(graph.module.get_submodule(removed).named_parameters())
    c = coefficient / max(len(near), 1)
    with torch.no_grad():
        for n in near:
            for name, p in graph.module.get_submodule(n).named_parameters():
                if name in src and src[name].shape == p.shape:
                    p.add_(src[name] - p, alpha=c)
    graph.remove_block(removed)
    return [_renumbered(n, removed) for n in near]


class _Stop(Exception):  # noqa: N818 - control flow: the group's output is known, the rest of the model is not run
    pass


def _group_output(module: nn.Module, path: str, names: Sequence[str], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hidden state at the output of block ``path`` (the model is run up to it only)."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _args: Any, out: Any) -> None:
        seen.append(hidden_of(out))
        raise _Stop

    handle = module.get_submodule(path).register_forward_hook(hook)
    try:
        module(**{n: batch[n] for n in names if n in batch})
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def finetune_group(graph: ModelGraph, teacher: ModelGraph, removed: str, near_before: Sequence[str],
                   params: Sequence[InjectedWeight], batches: Sequence[dict[str, torch.Tensor]], steps: int,
                   lr: float, seed: int) -> dict[str, Any] | None:
    """Local distillation of the group: fit the hidden state at the end of the group (the neighbours and the removed
    block's place) in ``graph`` to the one in ``teacher`` (the model before the removal) with only the
    coefficient matrices learned. ``near_before``: the neighbours' paths before the removal."""
    if steps <= 0 or not params or not batches:
        return None
    container, r = _index(removed)
    end = max([r, *(_index(p)[1] for p in near_before)])
    teacher_path = f"{container}.{end}"
    student_path = f"{container}.{end - 1}"  # the removed block's place renumbers the later blocks
    names = list(graph.input_spec.names)
    with torch.no_grad():
        targets = [_group_output(teacher.module, teacher_path, names, b).detach() for b in batches]
    trainable = [t for p in params for t in (p.a, p.b)]
    frozen = [(t, t.requires_grad) for t in graph.module.parameters()]
    for t, _ in frozen:
        t.requires_grad_(False)
    for t in trainable:
        t.requires_grad_(True)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(trainable, lr=lr)
    losses = []
    graph.module.eval()
    try:
        for step in range(steps):
            i = step % len(batches)
            s = _group_output(graph.module, student_path, names, batches[i])
            t = targets[i]
            loss = ((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for t, req in frozen:
            t.requires_grad_(req)
    return {"steps": steps, "loss_start": losses[0], "loss_end": losses[-1]}
