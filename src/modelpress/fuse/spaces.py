"""Alignment spaces: the graph's groups as sets of units that one transport map moves together.

A Space is one group of the model graph (``ModelGraph.groups``): its units, and for every parameter slot
``(param, axis)`` the positions of each unit, ``positions[slot]`` of shape [units, columns]. Column ``c``
of a slot is one position per unit (an MLP unit has one row in fc1 and one column in fc2; a residual
channel one entry per LayerNorm, embedding and reader).

Attention is aligned at the level of *cells*: one cell is dimension ``d`` of head ``h`` (the graph's head
group crossed with its head-width group, ``modelpress.graph.head_dims``), so maps may keep heads intact
(``per-head``) or move dimensions freely (``shared`` / ``separate``). The columns of a head slot are its
q/k/v parts (a fused qkv projection has three); each column gets a role, ``q``, ``k`` or ``v``, found by
probing the anchor model: scaling one part of a head by 2 and another by 1/2 leaves the output unchanged
exactly when they are that head's queries and keys (``q . k`` is bilinear). Input columns of the output
projection read the attention output, so they take the values' role. Slots with one entry per head (a
per-head bias table) follow the head-level map.

Groups at the model's input, and channel groups (a classifier's classes, a pooler at the output) are
``fixed``: the identity map, never aligned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from modelpress.graph import ModelGraph
from modelpress.graph.groups import Group, Slot

ALIGNED_KINDS = ("embedding", "head", "mlp", "conv")
WIDTH_KEYS = ("embedding", "head", "mlp", "conv")


@dataclass
class Space:
    """One group as an alignment space (see the module)."""

    name: str
    kind: str
    size: int  # units (cells for attention: heads x head width)
    positions: dict[Slot, np.ndarray]  # [size, columns]
    inputs: frozenset[Slot]  # slots read by a Linear/conv (input side): they take the input-side map
    roles: dict[Slot, list[str]] = field(default_factory=dict)  # per column: "q" | "k" | "v" | "all"
    fixed: bool = False
    heads: int = 0  # attention: heads (units of the head group)
    head_dim: int = 0  # attention: cells per head
    head_positions: dict[Slot, np.ndarray] = field(default_factory=dict)  # per-head slots: [heads, columns]
    units: int = 0  # units of the group (heads for attention)

    def role(self, slot: Slot, column: int) -> str:
        return self.roles.get(slot, ["all"] * (column + 1))[column]


def build_spaces(graph: ModelGraph, roles: dict[str, dict[Slot, list[str]]] | None = None) -> list[Space]:
    """Every group of ``graph`` (head-width groups folded into their heads) as a Space, in graph order.

    ``roles``: the q/k/v roles per head space (from :func:`qk_roles` on the anchor); None probes ``graph``.
    """
    out: list[Space] = []
    for g in graph.groups:
        if g.kind == "head_dim":
            continue
        fixed = g.kind not in ALIGNED_KINDS or bool(g.meta.get("fixed")) or (
            bool(g.meta.get("at_output")) and g.kind != "embedding")
        inputs = frozenset(g.meta.get("input_slots") or [])
        if g.kind == "head" and not fixed:
            space = _head_space(g, inputs)
            if space is not None:
                out.append(space)
                continue
        positions = _unit_positions(g)
        if positions is None:
            positions, fixed = {s: np.stack([np.asarray(u[s])[:1] for u in g.units]) for s in g.slots}, True
        out.append(Space(g.name, g.kind, g.size, positions, inputs, fixed=fixed, units=g.size))
    if roles is None:
        roles = qk_roles(graph, out)
    for s in out:
        if s.name in roles:
            s.roles = {slot: list(r) for slot, r in roles[s.name].items() if slot in s.positions}
    return out


def _unit_positions(g: Group) -> dict[Slot, np.ndarray] | None:
    out = {}
    for slot in g.slots:
        lengths = {len(u[slot]) for u in g.units}
        if len(lengths) != 1:
            return None
        out[slot] = np.stack([np.sort(np.asarray(u[slot])) for u in g.units]).astype(np.int64)
    return out


def _head_space(g: Group, inputs: frozenset[Slot]) -> Space | None:
    """Cells of a multi-head attention group; None when heads do not split into equal-width blocks."""
    if g.heads_per_unit != 1 or g.kv_heads_per_unit != 1:
        return None  # grouped-query attention: aligned as whole units
    hd = g.head_dim()
    if hd < 1:
        return None
    positions, head_positions = {}, {}
    for slot in g.slots:
        per_head = [np.sort(np.asarray(u[slot])) for u in g.units]
        n = {len(p) for p in per_head}
        if len(n) != 1:
            return None
        n_s = n.pop()
        if n_s % hd:
            if n_s < hd:
                head_positions[slot] = np.stack(per_head)
                continue
            return None
        blocks = n_s // hd
        cells = [p.reshape(blocks, hd).T for p in per_head]  # per head: [hd, blocks]
        positions[slot] = np.concatenate(cells, 0).astype(np.int64)
    if not positions:
        return None
    return Space(g.name, "head", g.size * hd, positions, inputs, heads=g.size, head_dim=hd,
                 head_positions=head_positions, units=g.size)


@torch.no_grad()
def qk_roles(graph: ModelGraph, spaces: list[Space]) -> dict[str, dict[Slot, list[str]]]:
    """Per head space: the role of every (slot, column), found by the bilinear probe (see the module).

    Parts whose role the probe cannot tell (no pair leaves the output unchanged) get ``"all"``.
    """
    inputs = graph.example_inputs(2, 8 if graph.input_spec.kind == "text" else None, seed=3)
    state = graph.state()
    reference = graph.forward(inputs).float()
    tol = 1e-4 * (float(reference.abs().max()) + 1e-6)
    out: dict[str, dict[Slot, list[str]]] = {}
    for s in spaces:
        if s.kind != "head" or s.fixed or not s.head_dim:
            continue
        parts: dict[tuple[str, int], list[tuple[Slot, int]]] = {}
        for slot, pos in s.positions.items():
            if slot in s.inputs:
                continue
            for col in range(pos.shape[1]):
                parts.setdefault((slot[0].rsplit(".", 1)[0], col), []).append((slot, col))
        keys = sorted(parts)
        qk: tuple | None = None
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                if _invariant(graph, state, s, parts[a], parts[b], inputs, reference, tol):
                    qk = (a, b)
                    break
            if qk:
                break
        roles: dict[Slot, list[str]] = {slot: ["all"] * pos.shape[1] for slot, pos in s.positions.items()}
        if qk is not None:
            for key, members in parts.items():
                role = "q" if key == qk[0] else "k" if key == qk[1] else "v"
                for slot, col in members:
                    roles[slot][col] = role
            for slot in s.inputs & set(s.positions):
                roles[slot] = ["v"] * s.positions[slot].shape[1]
        out[s.name] = roles
    return out


def _invariant(graph: ModelGraph, state: dict, s: Space, up: list, down: list, inputs: dict,
               reference: torch.Tensor, tol: float) -> bool:
    """Whether scaling head 0's part ``up`` by 2 and part ``down`` by 1/2 leaves the output unchanged."""
    saved = {}
    try:
        for members, factor in ((up, 2.0), (down, 0.5)):
            for (param, axis), col in members:
                t = state[param]
                saved.setdefault(param, t.detach().clone())
                idx = torch.as_tensor(s.positions[(param, axis)][: s.head_dim, col])
                t.data.index_copy_(axis, idx, t.data.index_select(axis, idx) * factor)
        return float((graph.forward(inputs).float() - reference).abs().max()) <= tol
    finally:
        for param, value in saved.items():
            state[param].data.copy_(value)
