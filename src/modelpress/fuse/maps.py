"""Transport maps and how they move parameters: the output side averages, the input side distributes.

A :class:`Map` holds one coupling ``T`` [n_src, n_tgt] per role (``q``, ``k``, ``v``, ``qk`` or ``all``).
Applied to a parameter slot of a source model it gives the slot in the target's units:

- output side (rows a unit writes, its bias, a LayerNorm's gamma/beta, an embedding's column): target unit
  ``j`` is the average of the source units sent to it, ``x'_j = sum_i T[i, j] / T[:, j].sum() x_i``;
- input side (the columns a reader multiplies a unit's value with): source unit ``i`` hands its column to
  the target units it was sent to in proportion, ``W'[:, j] = sum_i W[:, i] T[i, j] / T[i, :].sum()``.

For a permutation both are the same permutation, so aligning is exact; merging two units into one (a
narrower target) sums their columns, which keeps the reader's output when the merged units agree.
:class:`Aligner` applies the maps of every space to whole parameters, axis by axis, positions no space
covers copied through.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from modelpress.errors import ModelpressError
from modelpress.fuse.spaces import Space
from modelpress.graph.groups import Slot

_FALLBACK = {"q": ("qk", "all"), "k": ("qk", "all"), "v": ("all",), "qk": ("all",), "all": ()}


@dataclass
class Map:
    """Couplings of one space, per role."""

    couplings: dict[str, np.ndarray] = field(default_factory=dict)

    def coupling(self, role: str) -> np.ndarray:
        for r in (role, *_FALLBACK.get(role, ("all",))):
            if r in self.couplings:
                return self.couplings[r]
        return next(iter(self.couplings.values()))

    def matrix(self, role: str, input_side: bool) -> torch.Tensor:
        """[n_tgt, n_src]: row j says how target unit j is made of the source units (see the module)."""
        t = self.coupling(role)
        mass = t.sum(1, keepdims=True) if input_side else t.sum(0, keepdims=True)
        m = np.divide(t, mass, out=np.zeros_like(t), where=mass > 0)
        return torch.from_numpy(np.ascontiguousarray(m.T))

    def head_coupling(self, role: str, heads: tuple[int, int], hd: tuple[int, int]) -> np.ndarray:
        t = self.coupling(role)
        return t.reshape(heads[0], hd[0], heads[1], hd[1]).sum(axis=(1, 3))

    @staticmethod
    def identity(n: int) -> Map:
        return Map({"all": np.eye(n) / n})


class Aligner:
    """Moves the parameters of one source model into the target's units, given maps per space name."""

    def __init__(self, source: list[Space], target: list[Space], target_shapes: dict[str, tuple[int, ...]]):
        self.src = {s.name: s for s in source}
        self.tgt = {s.name: s for s in target}
        missing = set(self.src) ^ set(self.tgt)
        if missing:
            raise ModelpressError(f"the models' groups differ: {sorted(missing)[:4]}",
                                  "fuse models of one architecture (same depth and kinds of layers)")
        self.shapes = target_shapes
        self.covers: dict[Slot, list[str]] = {}
        for s in source:
            for slot in (*s.positions, *s.head_positions):
                self.covers.setdefault(slot, []).append(s.name)

    def axis_spaces(self, param: str, ndim: int) -> dict[int, list[str]]:
        return {ax: self.covers[(param, ax)] for ax in range(ndim) if (param, ax) in self.covers}

    def transform(self, param: str, tensor: torch.Tensor, maps: dict[str, Map | None],
                  skip: str | None = None, target_shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """``tensor`` (parameter ``param`` of the source) in the target's units on every axis whose spaces
        have maps (``skip``: leave that space's axes as they are); None when an axis has no map yet."""
        out = tensor.detach().double()
        shape = target_shape or self.shapes.get(param, tuple(tensor.shape))
        for ax, names in self.axis_spaces(param, tensor.dim()).items():
            if skip is not None and skip in names:
                continue
            if any(n not in maps for n in names):
                return None
            out = self._axis(param, ax, out, names, maps, shape[ax])
        return out

    def _axis(self, param: str, ax: int, t: torch.Tensor, names: list[str], maps: dict[str, Map | None],
              size: int) -> torch.Tensor:
        slot = (param, ax)
        new_shape = list(t.shape)
        new_shape[ax] = size
        out = torch.zeros(new_shape, dtype=t.dtype)
        src_seen, tgt_seen = [], []
        for name in names:
            s, g, m = self.src[name], self.tgt[name], maps[name]
            if slot in s.head_positions:
                src_pos, tgt_pos = s.head_positions[slot], g.head_positions[slot]
                if m is None:
                    mats = [torch.eye(len(src_pos), dtype=t.dtype)] * src_pos.shape[1]
                else:
                    mats = [_head_matrix(m, s, g, slot in s.inputs)] * src_pos.shape[1]
            else:
                src_pos, tgt_pos = s.positions[slot], g.positions[slot]
                if m is None:
                    if len(src_pos) != len(tgt_pos):
                        raise ModelpressError(f"group {name} differs in size between the models ({len(src_pos)} vs "
                                              f"{len(tgt_pos)}) and cannot be aligned", "fuse models whose fixed groups agree")
                    mats = [torch.eye(len(src_pos), dtype=t.dtype)] * src_pos.shape[1]
                else:
                    mats = [m.matrix(s.role(slot, c), slot in s.inputs).to(t.dtype) for c in range(src_pos.shape[1])]
            for c, mat in enumerate(mats):
                x = t.index_select(ax, torch.as_tensor(src_pos[:, c])).movedim(ax, 0)
                y = (mat @ x.reshape(x.shape[0], -1)).reshape(mat.shape[0], *x.shape[1:]).movedim(0, ax)
                out.index_copy_(ax, torch.as_tensor(tgt_pos[:, c]), y)
            src_seen.append(src_pos.reshape(-1))
            tgt_seen.append(tgt_pos.reshape(-1))
        rest_src = np.setdiff1d(np.arange(t.shape[ax]), np.concatenate(src_seen))
        rest_tgt = np.setdiff1d(np.arange(size), np.concatenate(tgt_seen))
        if len(rest_src) != len(rest_tgt):
            raise ModelpressError(f"{param} axis {ax} has {len(rest_src)} positions outside every group in one model "
                                  f"and {len(rest_tgt)} in the target", "fuse models of one architecture")
        if len(rest_src):
            out.index_copy_(ax, torch.as_tensor(rest_tgt), t.index_select(ax, torch.as_tensor(rest_src)))
        return out


def _head_matrix(m: Map, s: Space, g: Space, input_side: bool) -> torch.Tensor:
    t = m.head_coupling("all", (s.heads, g.heads), (s.head_dim, g.head_dim))
    mass = t.sum(1, keepdims=True) if input_side else t.sum(0, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(np.divide(t, mass, out=np.zeros_like(t), where=mass > 0).T))
