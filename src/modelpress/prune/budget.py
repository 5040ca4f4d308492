"""What pruning saves: the resource a unit costs (parameters, MACs or latency) and the model's total.

Parameters and MACs are counted from the unit's parameter slices: a slice of a Linear or convolution
weight costs its elements times the positions the layer runs at (tokens, pixels) for MACs, and its
elements for parameters; biases and norm vectors count as parameters only. The attention products
(QK^T, AV) are not counted per unit (they scale with the head width and the sequence squared; the
latency model sees them). Latency comes from a latency model over per-block widths
(:func:`widths`), whose slope gives the saving of one unit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from torch import nn

from modelpress.graph import Group, ModelGraph
from modelpress.graph.stats import block_widths, count_macs, embedding_width, in_block, output_positions

RESOURCES = ("params", "macs", "latency")

# what a pruning config can name: the graph's group kinds, and whole blocks (each pass checks which it takes)
Kind = Literal["head", "head_dim", "mlp", "embedding", "conv", "channel", "block"]


def round_keep(keep: float, size: int, multiple: int = 1, floor: int = 1, *, nearest: bool = False) -> int:
    """How many units of a group of ``size`` to keep: ``keep`` rounded to a multiple of ``multiple`` (down,
    so that at least the units chosen for removal go; ``nearest`` for a fixed ratio), never below ``floor``
    (rounded up to a multiple) nor one multiple, never above ``size``. The one rounding rule of prune/."""
    if multiple > 1:
        steps = round(keep / multiple) if nearest else keep // multiple
        keep = max(int(steps) * multiple, -(-floor // multiple) * multiple, multiple)
    return int(min(size, max(keep, floor)))


@dataclass
class Widths:
    """The shape a latency model reads: per block (path) heads, head dim and MLP width; embedding width;
    conv group name -> channels (and each conv group's scope, so a removed block takes its conv groups along)."""

    blocks: dict[str, dict[str, int]]
    embedding: int
    convs: dict[str, int] = field(default_factory=dict)
    conv_scopes: dict[str, str] = field(default_factory=dict)

    def without(self, group: Group, n: int = 1) -> Widths:
        """The widths after removing ``n`` units of ``group`` (its kind decides which width shrinks)."""
        out = Widths(copy.deepcopy(self.blocks), self.embedding, dict(self.convs), self.conv_scopes)
        if group.kind == "embedding":
            out.embedding -= n
            return out
        if group.kind == "conv":
            out.convs[group.name] = out.convs.get(group.name, group.size) - n
            return out
        for path, row in out.blocks.items():
            if not in_block(group.scope, path):
                continue
            if group.kind == "head":
                row["heads"] = row.get("heads", 0) - n * group.heads_per_unit
            elif group.kind == "head_dim":
                row["head_dim"] = row.get("head_dim", 0) - n
            elif group.kind == "mlp":
                row["mlp"] = row.get("mlp", 0) - n
            return out
        return out

    def without_block(self, path: str) -> Widths:
        convs = {k: v for k, v in self.convs.items() if not in_block(self.conv_scopes.get(k, ""), path)}
        return Widths({k: dict(v) for k, v in self.blocks.items() if k != path}, self.embedding, convs,
                      self.conv_scopes)


def widths(graph: ModelGraph) -> Widths:
    """The graph's current widths, from the graph's own per-block widths (:func:`block_widths`: a block's
    head dim is the width its attention reshapes by, which a head-width cut shrinks)."""
    rows = {
        r["block"]: {k: int(r[k]) for k in ("heads", "head_dim", "mlp") if k in r} for r in block_widths(graph)
    }
    convs = [g for g in graph.groups if g.kind == "conv"]
    return Widths(rows, int(embedding_width(graph) or 0), {g.name: g.size for g in convs},
                  {g.name: g.scope for g in convs})


LatencyFn = Callable[[Widths], float]


class Costs:
    """Per-unit cost of every group in one resource, and the model's total."""

    def __init__(self, graph: ModelGraph, resource: str, latency: LatencyFn | None = None) -> None:
        if resource not in RESOURCES:
            raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}")
        self.resource = resource
        self.latency = latency
        self.positions = output_positions(graph) if resource == "macs" else {}

    def total(self, graph: ModelGraph) -> float:
        if self.resource == "params":
            return float(graph.num_parameters())
        if self.resource == "macs":
            seq = graph.input_spec.default_seq_len if graph.input_spec.kind == "text" else None
            return float(count_macs(graph, 1, seq))
        return float(self.latency(widths(graph)))

    def units(self, graph: ModelGraph, group: Group, current: Widths | None = None) -> np.ndarray:
        """The cost of each unit of ``group`` (the saving its removal brings)."""
        if self.resource == "latency":
            current = current or widths(graph)
            step = self.latency(current) - self.latency(current.without(group, 1))
            return np.full(group.size, max(step, 0.0))
        return self._slices(graph, group, self.resource)

    def units_inside(
        self, graph: ModelGraph, group: Group, paths: list[str], unit_cost: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """The part of each unit's cost that lies inside each block of ``paths``: what removing that block
        already saves of the unit (a residual-stream channel's slices in the block's norms and projections),
        so a plan that removes both counts it once. Exact for parameters and MACs; a latency cost is split
        in the proportion of the unit's parameters inside each block."""
        out: dict[str, np.ndarray] = {}
        if self.resource == "latency":
            total = self._slices(graph, group, "params")
            cost = self.units(graph, group) if unit_cost is None else unit_cost
            for path in paths:
                inside = self._slices(graph, group, "params", path)
                if inside.any():
                    out[path] = cost * np.divide(inside, total, out=np.zeros_like(inside), where=total > 0)
            return out
        for path in paths:
            inside = self._slices(graph, group, self.resource, path)
            if inside.any():
                out[path] = inside
        return out

    def _slices(self, graph: ModelGraph, group: Group, resource: str, within: str | None = None) -> np.ndarray:
        """Per unit: the parameters (or MACs) of the group's slices, only those inside block ``within`` if given."""
        per_unit = np.zeros(group.size)
        params = dict(graph.module.named_parameters())
        for param, axis in group.slots:
            t = params.get(param)
            if t is None or (within is not None and not in_block(param, within)):
                continue
            per_elem = t.numel() // max(1, t.shape[axis])
            if resource == "macs":
                owner = param.rsplit(".", 1)[0]
                mod = graph.module.get_submodule(owner) if owner in self.positions else None
                if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not param.endswith("weight"):
                    continue
                per_elem *= self.positions.get(owner, 0)
            per_unit += np.array([len(u[(param, axis)]) for u in group.units]) * per_elem
        return per_unit

    def block(self, graph: ModelGraph, path: str, current: Widths | None = None) -> float:
        """The saving of deleting block ``path``."""
        if self.resource == "latency":
            current = current or widths(graph)
            return max(self.latency(current) - self.latency(current.without_block(path)), 0.0)
        mod = graph.module.get_submodule(path)
        if self.resource == "params":
            return float(sum(p.numel() for p in mod.parameters()))
        return float(
            sum(
                p.numel() * self.positions.get(f"{path}.{n.rsplit('.', 1)[0]}", 0)
                for n, p in mod.named_parameters()
                if n.endswith("weight")
            )
        )
