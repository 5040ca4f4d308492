"""Hidden-state distillation (MiniLM / TinyBERT style): the student's block outputs matched to the teacher's.

Which layers are matched comes from the ModelGraph: every residual block of the student (``graph.blocks``)
is paired with the teacher's block it descends from (the graph's lineage follows block deletions), so a
pruned model whose blocks were removed matches its remaining blocks to the original ones they were. A block's
hidden state is its output (the first tensor when it returns a tuple).

The loss of one pair is a normalized mean squared error over the valid positions (the attention mask's
tokens for text):

    ||M(h_s) - h_t||^2 / ||h_t||^2

where ``M`` is the identity when the widths agree and a learned linear map (student width -> teacher width,
along the one axis whose size differs: the residual width, pruned) otherwise, initialised by least squares
on a few training samples. Normalizing by the teacher's energy makes the loss scale-free across layers and
models (one weight serves MiniLM and the digits ViT); the hidden loss is the mean over pairs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph

__all__ = ["HiddenMaps", "block_output", "capture", "hidden_distance", "hidden_loss", "hidden_pairs", "token_weights"]

_LSQ_DAMP = 1e-3  # ridge damping of the map's least-squares start, relative to the mean diagonal of X^T X


def hidden_pairs(student: ModelGraph, teacher: ModelGraph) -> list[tuple[str, str]]:
    """(student module path, teacher module path) for every residual block of ``student`` whose original
    block is a block of ``teacher``, in the student's block order. Paths are relative to the graphs' modules."""
    teacher_paths = {teacher.original_path(b.path): b.path for b in teacher.blocks}
    pairs = []
    for block in student.blocks:
        match = teacher_paths.get(student.original_path(block.path))
        if match is not None:
            pairs.append((block.path, match))
    return pairs


def block_output(out: Any) -> torch.Tensor | None:
    """A block's hidden state: its output tensor, the first tensor of a tuple/list, or ``last_hidden_state``."""
    y = out[0] if isinstance(out, (tuple, list)) and out else out
    y = getattr(y, "last_hidden_state", y)
    return y if isinstance(y, torch.Tensor) else None


@contextlib.contextmanager
def capture(module: nn.Module, paths: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks on ``module``'s submodules ``paths``; the yielded dict holds the latest output of each."""
    found: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for path in paths:
            try:
                sub = module.get_submodule(path)
            except AttributeError as err:
                raise ModelpressError(
                    f"hidden-state distillation: the model has no module {path!r}",
                    "match blocks of this model (train.hidden_pairs)",
                ) from err

            def hook(_m: nn.Module, _args: Any, out: Any, _p: str = path) -> None:
                y = block_output(out)
                if y is not None:
                    found[_p] = y

            handles.append(sub.register_forward_hook(hook))
        yield found
    finally:
        for h in handles:
            h.remove()


class HiddenMaps(nn.Module):
    """One learned linear map (student width -> teacher width, no bias) per pair whose widths differ; pairs
    of equal widths map by the identity and own no parameters."""

    def __init__(self, pairs: list[tuple[str, str]], student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
        super().__init__()
        self.axes: list[int | None] = []
        self.maps = nn.ModuleDict()
        for i, ((s_path, t_path), hs, ht) in enumerate(zip(pairs, student, teacher, strict=True)):
            axis = _width_axis(hs.shape, ht.shape, s_path, t_path)
            self.axes.append(axis)
            if axis is not None:
                self.maps[str(i)] = nn.Linear(hs.shape[axis], ht.shape[axis], bias=False)

    def forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Pair ``i``'s student hidden state in the teacher's width."""
        axis = self.axes[i]
        if axis is None:
            return h
        return self.maps[str(i)](h.movedim(axis, -1)).movedim(-1, axis)

    @torch.no_grad()
    def fit(self, student: list[torch.Tensor], teacher: list[torch.Tensor], weights: torch.Tensor | None) -> None:
        """Start every map at the damped least-squares solution of ``M h_s = h_t`` on these hidden states."""
        for i, axis in enumerate(self.axes):
            if axis is None:
                continue
            x = student[i].detach().movedim(axis, -1).double()
            y = teacher[i].detach().to(x.device).movedim(axis, -1).double()
            if weights is not None and tuple(weights.shape) == tuple(x.shape[: weights.ndim]):
                keep = weights.reshape(weights.shape + (1,) * (x.ndim - 1 - weights.ndim)).expand(x.shape[:-1]) > 0
                x, y = x[keep], y[keep]
            self.set_least_squares(i, x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))

    @torch.no_grad()
    def set_least_squares(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set pair ``i``'s map to the damped least-squares solution of ``M x = y`` (rows [N, width])."""
        x, y = x.double(), y.double()
        gram = x.T @ x
        damp = _LSQ_DAMP * gram.diagonal().mean().clamp_min(1e-12)
        solution = torch.linalg.solve(gram + damp * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ y)
        layer = self.maps[str(i)]
        layer.weight.copy_(solution.T.to(layer.weight.dtype))


def _width_axis(s: torch.Size, t: torch.Size, s_path: str, t_path: str) -> int | None:
    """The one axis on which the student's and the teacher's hidden states differ (None when they agree)."""
    differ = [a for a in range(len(s)) if len(s) == len(t) and s[a] != t[a]]
    if len(s) != len(t) or len(differ) > 1 or (differ and differ[0] == 0):
        raise ModelpressError(
            f"hidden-state distillation: {s_path} outputs {tuple(s)}, its teacher block {t_path} {tuple(t)}: "
            "they may differ in one width only",
            "set hidden_weight=0 (output distillation only) for this model",
        )
    return differ[0] if differ else None


def token_weights(batch: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor | None:
    """[B, S] weights of the valid tokens when ``h`` is per token of a masked batch, else None (all count)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2 or tuple(h.shape[:2]) != tuple(mask.shape):
        return None
    return mask.ne(0).to(h.dtype)


def hidden_loss(
    maps: HiddenMaps, student: list[torch.Tensor], teacher: list[torch.Tensor], batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Mean over pairs of ``||M(h_s) - h_t||^2 / ||h_t||^2`` on the valid positions (see the module text)."""
    total = student[0].new_zeros(())
    for i, (hs, ht) in enumerate(zip(student, teacher, strict=True)):
        hs = maps(i, hs)
        ht = ht.to(hs.dtype)
        sq_err, sq_ref = (hs - ht).pow(2), ht.pow(2)
        w = token_weights(batch, hs)
        if w is not None:
            w = w.reshape(w.shape + (1,) * (hs.ndim - 2))
            sq_err, sq_ref = sq_err * w, sq_ref * w
        total = total + sq_err.sum() / sq_ref.sum().clamp_min(1e-12)
    return total / max(1, len(student))


@torch.no_grad()
def hidden_distance(
    student: nn.Module,
    teacher: nn.Module,
    pairs: list[tuple[str, str]],
    batches: list[dict[str, torch.Tensor]],
    names: list[str],
) -> list[float]:
    """Per pair, the normalized squared error ``||M(h_s) - h_t||^2 / ||h_t||^2`` of the two models' block
    outputs summed over ``batches`` (held-out data; both models in eval mode). ``M`` is the identity where
    widths agree, else the least-squares map fitted on these same batches (how linearly the teacher's state
    can be read from the student's)."""
    from modelpress.graph.run import call_module

    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    hs_all: list[list[torch.Tensor]] = [[] for _ in pairs]
    ht_all: list[list[torch.Tensor]] = [[] for _ in pairs]
    masks: list[torch.Tensor | None] = []
    try:
        for batch in batches:
            with capture(student, [s for s, _ in pairs]) as fs, capture(teacher, [t for _, t in pairs]) as ft:
                call_module(student, batch, names)
                call_module(teacher, batch, names)
            for i, (s, t) in enumerate(pairs):
                hs_all[i].append(fs[s])
                ht_all[i].append(ft[t])
            masks.append(token_weights(batch, fs[pairs[0][0]]))
    finally:
        student.train(was[0])
        teacher.train(was[1])
    out = []
    for i in range(len(pairs)):
        err = ref = 0.0
        maps = HiddenMaps([pairs[i]], hs_all[i][:1], ht_all[i][:1])
        axis = maps.axes[0]
        if axis is not None:
            maps.set_least_squares(0, _flat_rows(hs_all[i], masks, axis), _flat_rows(ht_all[i], masks, axis))
        for hs, ht, w in zip(hs_all[i], ht_all[i], masks, strict=True):
            d2, r2 = (maps(0, hs) - ht).pow(2), ht.pow(2)
            if w is not None:
                w = w.reshape(w.shape + (1,) * (hs.ndim - 2))
                d2, r2 = d2 * w, r2 * w
            err, ref = err + float(d2.sum()), ref + float(r2.sum())
        out.append(err / max(ref, 1e-12))
    return out


def _flat_rows(hs: list[torch.Tensor], masks: list[torch.Tensor | None], axis: int) -> torch.Tensor:
    """Every valid position's vector along ``axis``, as rows [N, width]."""
    rows = []
    for h, w in zip(hs, masks, strict=True):
        x = h.movedim(axis, -1)
        if w is not None:
            x = x[w > 0]
        rows.append(x.reshape(-1, x.shape[-1]))
    return torch.cat(rows)
