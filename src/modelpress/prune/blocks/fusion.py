"""Recycling a removed block into its neighbours (FuseGPT's group-level layer fusion, and a LaCo-style merge).

Learned fusion: for each weight matrix ``W_r`` (and bias ``b_r``) of the removed block (a Linear, or
transformers' Conv1D: any 2-D ``weight``), the layer of the same name in each of the K nearest kept blocks of
its container becomes

    W_n' = W_n + (A_n B_n) ⊙ W_r        b_n' = b_n + c_n ⊙ b_r

with ``W_n``, ``b_n`` and the injected ``W_r``, ``b_r`` frozen and the low-rank coefficient matrix ``A_n B_n``
(rank r) and the per-output bias coefficients ``c_n`` learned, one set per neighbour layer. ``A_n`` and ``c_n``
start at zero and ``B_n`` Kaiming-uniform, so before fine-tuning the model is exactly plain removal. The group
(the neighbours and the removed block's place) is fine-tuned by local distillation: the hidden state at the
end of the group is fitted to the one of the model before the removal, on calibration data, label-free (Adam,
betas 0.9/0.95, cosine-annealed learning rate). ``fold`` then writes ``W_n'``, ``b_n'`` into the dense
weights: the result has the architecture of plain removal.

Checked against the authors' code (JarvisPei/FuseGPT, ``fuse_utils.py``: ``FuseLinear``, ``Fuser.update``;
``run_fusion.py``: ``run_macro_fusion``): the same injection (``coef_matrix`` + ``coef_lora``: a zero
``(out, r)`` factor times a Kaiming-uniform ``(r, in)`` factor, elementwise with the frozen injected weight;
a zero per-output bias coefficient), the group a window of nearest blocks (``--group-size`` 8 counts the
removed block: 7 neighbours, more before than after, which the tie rule here reproduces), coefficient
learning rate 1e-3 with Adam betas (0.9, 0.95) and cosine annealing. Not reproduced: their fine-tuning also
moves the group's other parameters (norms, biases, a rank-128 LoRA on each neighbour's own weight) at
lr 9.65e-6: ``tune_group`` does the same (every 1-D parameter of the neighbours, the norms and biases, and a
zero-started low-rank delta on each neighbour matrix, :class:`LowRankDelta`, at their own learning rate), and
``fold`` writes the deltas into the dense weights too. Their distillation loss is a KL divergence of hidden
states softmaxed over the batch axis (``F.kl_div(log_softmax(h, 0), softmax(h_full, 0), 'batchmean')`` in
``Fuser.update``): ``loss="kl-batch"`` here; the default, ``"mse"``, is a normalized MSE of the group's output
hidden state.

Merge (LaCo-style): ``W_n' = W_n + c (W_r - W_n)`` for every parameter of the removed block with a
same-named, same-shaped parameter in a neighbour (``c`` split over the K neighbours), without learning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from modelpress.graph import Block, ModelGraph
from modelpress.prune.blocks.importance import hidden_at


class InjectedWeight(nn.Module):
    """Parametrization ``W -> W + (A @ B) * injected`` with ``injected`` frozen, ``A`` (zeros) and ``B``
    (Kaiming-uniform, as ``nn.Linear`` initializes a weight) learned."""

    def __init__(self, injected: torch.Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        out_f, in_f = injected.shape
        rank = max(1, min(rank, out_f, in_f))
        bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) of a (rank, in_f) matrix
        self.register_buffer("injected", injected.detach().clone())
        self.a = nn.Parameter(torch.zeros(out_f, rank, dtype=injected.dtype))
        self.b = nn.Parameter((torch.rand(rank, in_f, generator=generator, dtype=injected.dtype) * 2 - 1) * bound)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.a @ self.b) * self.injected


class InjectedBias(nn.Module):
    """Parametrization ``b -> b + c * injected`` with ``injected`` frozen and ``c`` (zeros) learned."""

    def __init__(self, injected: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("injected", injected.detach().clone())
        self.c = nn.Parameter(torch.zeros_like(self.injected))

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + self.c * self.injected


class LowRankDelta(nn.Module):
    """Parametrization ``W -> W + A @ B`` (LoRA on a neighbour's own weight) with ``A`` zero, ``B`` Kaiming-uniform."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        rank = max(1, min(rank, out_f, in_f))
        self.a = nn.Parameter(torch.zeros(out_f, rank, dtype=weight.dtype, device=weight.device))
        b = (torch.rand(rank, in_f, generator=generator, dtype=weight.dtype) * 2 - 1) / math.sqrt(in_f)
        self.b = nn.Parameter(b.to(weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.a @ self.b


def _index(path: str) -> tuple[str, int]:
    container, _, idx = path.rpartition(".")
    return container, int(idx)


def neighbours(blocks: Sequence[Block], removed: str, k: int) -> list[str]:
    """The ``k`` blocks of ``removed``'s container nearest to it (ties: the earlier block first, so an odd group
    has one more block before the removed one than after, as FuseGPT's windows do), in model order."""
    container, r = _index(removed)
    same = [b.path for b in blocks if b.path != removed and b.container == container]
    near = sorted(same, key=lambda p: (abs(_index(p)[1] - r), _index(p)[1]))[: max(k, 0)]
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


def _bias(layer: nn.Module) -> torch.Tensor | None:
    b = getattr(layer, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def _pairs(graph: ModelGraph, removed: str, near: Sequence[str]
           ) -> list[tuple[str, str, torch.Tensor, torch.Tensor | None]]:
    """(neighbour path, relative layer name, the removed block's weight, its bias or None) for every layer both
    have with the same weight shape (the bias only where both have one of the same shape)."""
    block = graph.module.get_submodule(removed)
    src = matrix_layers(block)
    out = []
    for n in near:
        dst = matrix_layers(graph.module.get_submodule(n))
        for rel, w in src.items():
            if rel not in dst or dst[rel].shape != w.shape:
                continue
            b_src = _bias(block.get_submodule(rel) if rel else block)
            b_dst = _bias(graph.module.get_submodule(n).get_submodule(rel) if rel else graph.module.get_submodule(n))
            keep_bias = b_src is not None and b_dst is not None and b_src.shape == b_dst.shape
            out.append((n, rel, w.detach().clone(), b_src.detach().clone() if keep_bias else None))
    return out


def tunable_group(graph: ModelGraph, near: Sequence[str], rank: int, seed: int) -> list[torch.Tensor]:
    """The authors' group tuning: a zero-started :class:`LowRankDelta` of ``rank`` on every matrix layer of the
    blocks ``near`` (registered on ``graph`` in place, folded by :func:`fold`) and every 1-D parameter of those
    blocks (norms, biases). Returns the tensors to train."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    for n in near:
        block = graph.module.get_submodule(n)
        for rel, w in matrix_layers(block).items():
            layer = block.get_submodule(rel) if rel else block
            delta = LowRankDelta(w.detach(), rank, gen)
            parametrize.register_parametrization(layer, "weight", delta)
            out += [delta.a, delta.b]
        out += [p for p in block.parameters() if p.ndim == 1]  # (fusion coefficients among them: trained once)
    return out


def remove_with_learnable_fusion(graph: ModelGraph, removed: str, k: int, rank: int,
                                 seed: int) -> tuple[list[str], list[nn.Module]]:
    """Remove block ``removed`` from ``graph`` (in place) and inject its weight matrices (and biases) into its
    ``k`` nearest neighbours as learnable parametrizations (zero coefficients: exactly plain removal).
    Returns the neighbours' paths after the removal and the parametrizations (to train, then :func:`fold`)."""
    near = neighbours(graph.blocks, removed, k)
    pairs = _pairs(graph, removed, near)
    graph.remove_block(removed)
    gen = torch.Generator().manual_seed(seed)
    params: list[nn.Module] = []
    for n, rel, w, b in pairs:
        block = graph.module.get_submodule(_renumbered(n, removed))
        layer = block.get_submodule(rel) if rel else block
        p = InjectedWeight(w.to(layer.weight.device), rank, gen)
        parametrize.register_parametrization(layer, "weight", p)
        params.append(p)
        if b is not None:
            q = InjectedBias(b.to(layer.bias.device))
            parametrize.register_parametrization(layer, "bias", q)
            params.append(q)
    return [_renumbered(n, removed) for n in near], params


def fold(graph: ModelGraph) -> int:
    """Write every injected parametrization of ``graph.module`` into its dense weight or bias; returns how many
    tensors were folded."""
    count = 0
    for m in list(graph.module.modules()):
        for name in ("weight", "bias"):
            if parametrize.is_parametrized(m, name):
                with torch.no_grad():
                    parametrize.remove_parametrizations(m, name, leave_parametrized=True)
                getattr(m, name).requires_grad_(False)
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


Loss = Literal["mse", "kl-batch"]


def group_loss(student: torch.Tensor, teacher: torch.Tensor, loss: Loss = "mse") -> torch.Tensor:
    """The group distillation loss between hidden states [batch, ...]: ``mse`` the MSE normalized by the teacher's
    mean square; ``kl-batch`` FuseGPT's KL of the teacher's from the student's states softmaxed over the batch
    axis (every other position a separate distribution over the batch), summed and divided by the batch size."""
    s, t = student.float(), teacher.float()
    if loss == "kl-batch":
        return torch.nn.functional.kl_div(torch.log_softmax(s, 0), torch.log_softmax(t, 0), reduction="batchmean",
                                          log_target=True)
    return ((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)


def _inputs(names: Sequence[str], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: batch[n] for n in names if n in batch}


def finetune_group(graph: ModelGraph, teacher: ModelGraph, removed: str, near_before: Sequence[str],
                   params: Sequence[nn.Module], batches: Sequence[dict[str, torch.Tensor]], steps: int,
                   lr: float, seed: int, group: Sequence[torch.Tensor] = (), group_lr: float = 0.0,
                   loss: Loss = "mse") -> dict[str, Any] | None:
    """Local distillation of the group: fit the hidden state at the end of the group (the neighbours and the removed
    block's place) in ``graph`` to the one in ``teacher`` (the model before the removal) with the coefficient
    matrices learned at ``lr`` and ``group`` (:func:`tunable_group`) at ``group_lr``, minimizing
    :func:`group_loss` ``loss``. ``near_before``: the neighbours' paths before the removal."""
    if steps <= 0 or not params or not batches:
        return None
    container, r = _index(removed)
    end = max([r, *(_index(p)[1] for p in near_before)])
    teacher_path = f"{container}.{end}"
    student_path = f"{container}.{end - 1}"  # the removed block's place renumbers the later blocks
    names = list(graph.input_spec.names)
    with torch.no_grad():
        targets = [hidden_at(teacher.module, teacher_path, _inputs(names, b)).detach() for b in batches]
    trainable = [t for p in params for t in p.parameters()]
    seen = {id(t) for t in trainable}
    tuned = [t for t in group if id(t) not in seen]
    frozen = [(t, t.requires_grad) for t in graph.module.parameters()]
    for t, _ in frozen:
        t.requires_grad_(False)
    for t in [*trainable, *tuned]:
        t.requires_grad_(True)
    torch.manual_seed(seed)
    groups = [{"params": trainable, "lr": lr}] + ([{"params": tuned, "lr": group_lr}] if tuned else [])
    opt = torch.optim.Adam(groups, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    graph.module.eval()
    try:
        for step in range(steps):
            i = step % len(batches)
            s = hidden_at(graph.module, student_path, _inputs(names, batches[i]))
            t = targets[i]
            value = group_loss(s, t, loss)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            schedule.step()
            losses.append(float(value.detach()))
    finally:
        for t, req in frozen:
            t.requires_grad_(req)
    return {"steps": steps, "loss": loss, "loss_start": losses[0], "loss_end": losses[-1]}
