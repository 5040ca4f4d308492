"""Groups of coupled parameter slices, built from dependency propagation."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from modelpress.graph.labels import Propagation

Slot = tuple[str, int]  # (parameter or buffer name, axis)

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Group:
    """A set of interchangeable units; each unit is a set of parameter slices removed together.

    kind: "head" (attention heads), "mlp" (hidden units between two Linears), "embedding"
    (residual-stream channels: embeddings, LayerNorms/RMSNorms and every reader and writer), "conv"
    (conv output channels with their BatchNorm and readers) or "channel" (anything else).

    A "head" unit is one key/value head with the query heads that read it: one query head under
    multi-head attention, ``heads_per_unit`` query heads under grouped-query attention (meta
    ``query_heads`` / ``kv_heads`` per unit, from the traced attention); multi-query attention (one
    key/value head) is a single unit, so not prunable. "head_dim" groups (modelpress.graph.head_dims)
    overlap a head group: one unit is the same dimension of every head (none for rotary models).
    """

    name: str
    kind: str
    scope: str
    units: list[dict[Slot, np.ndarray]]
    prunable: bool = True
    reason: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def slots(self) -> list[Slot]:
        return sorted(self.units[0].keys()) if self.units else []

    def unit_width(self) -> int:
        """Elements of one unit along a Linear/conv input axis (query heads x head dim for heads, 1 for MLPs)."""
        if not self.units:
            return 0
        reads = self.meta.get("input_slots")
        if reads is None:  # groups made before input axes were recorded: Linear layout [out, in]
            reads = [(p, a) for p, a in self.units[0] if a == 1 and p.endswith("weight")]
        in_axes = [len(v) for slot, v in self.units[0].items() if slot in reads]
        return max(in_axes) if in_axes else max(len(v) for v in self.units[0].values())

    @property
    def heads_per_unit(self) -> int:
        """Query heads in one unit of a head group (1 under multi-head attention); 0 for other kinds."""
        return int(self.meta.get("query_heads", 1)) if self.kind == "head" else 0

    @property
    def kv_heads_per_unit(self) -> int:
        """Key/value heads in one unit of a head group (1 under multi-head and grouped-query attention)."""
        return int(self.meta.get("kv_heads", 1)) if self.kind == "head" else 0

    def head_dim(self) -> int:
        """Width of one attention head (0 for groups that are not heads)."""
        return self.unit_width() // self.heads_per_unit if self.kind == "head" else 0

    @property
    def query_heads(self) -> int:
        """Query (attention) heads of the group: units x query heads per unit."""
        return self.size * self.heads_per_unit

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the group: units x key/value heads per unit."""
        return self.size * self.kv_heads_per_unit

    def describe(self) -> str:
        return f"{self.name} ({self.kind}, {self.size} units{'' if self.prunable else ', fixed: ' + self.reason})"


def _common_scope(names: list[str]) -> str:
    mods = [n.rsplit(".", 1)[0] if "." in n else "" for n in names]
    if not mods:
        return ""
    prefix = os.path.commonprefix([m.split(".") for m in mods])
    return ".".join(prefix)


def build_groups(prop: Propagation, module: nn.Module) -> list[Group]:
    """Cluster propagation components into Groups by their signature (which slots, how many each)."""
    modules = dict(module.named_modules())
    space_of = np.zeros(len(prop.roots), dtype=np.int64)
    for i, s in enumerate(prop.spaces):
        space_of[s.start : s.start + s.size] = i
    order = np.argsort(prop.roots, kind="stable")
    roots_sorted = prop.roots[order]
    cuts = np.flatnonzero(np.diff(roots_sorted)) + 1
    components = np.split(order, cuts)

    families: dict[tuple, list[dict[Slot, np.ndarray]]] = defaultdict(list)
    fam_flags: dict[tuple, tuple[bool, bool, bool]] = {}
    fam_heads: dict[tuple, tuple[int, int]] = {}
    query = prop.query_heads if prop.query_heads is not None else np.zeros(len(prop.roots), dtype=np.int64)
    kv = prop.kv_heads if prop.kv_heads is not None else np.zeros(len(prop.roots), dtype=np.int64)
    reads = {(s.param, s.axis) for s in prop.spaces if s.role == "in"}
    for comp in components:
        unit: dict[Slot, np.ndarray] = {}
        for si in np.unique(space_of[comp]):
            s = prop.spaces[int(si)]
            local = np.sort(comp[space_of[comp] == si] - s.start)
            unit[(s.param, s.axis)] = local
        sig = tuple(sorted((k, len(v)) for k, v in unit.items()))
        families[sig].append(unit)
        flags = (bool(prop.pinned[comp[0]]), bool(prop.head_ids[comp[0]]), bool(prop.at_output[comp[0]]))
        prev = fam_flags.get(sig, (False, False, False))
        fam_flags[sig] = tuple(p or f for p, f in zip(prev, flags, strict=True))
        q0, kv0 = fam_heads.get(sig, (0, 0))
        fam_heads[sig] = (max(q0, int(query[comp[0]])), max(kv0, int(kv[comp[0]])))

    groups: list[Group] = []
    for sig, units in families.items():
        pinned, head, at_output = fam_flags[sig]
        slots = [k for k, _ in sig]
        units.sort(key=lambda u: tuple(int(u[s][0]) for s in slots))
        kind = _classify(slots, head, modules)
        scope = _common_scope([p for p, _ in slots])
        g = Group(name="", kind=kind, scope=scope, units=units)
        g.meta["at_output"] = at_output
        g.meta["input_slots"] = [slot for slot in slots if slot in reads]
        if kind == "head":
            q, k = fam_heads[sig]
            g.meta["query_heads"], g.meta["kv_heads"] = max(q, 1), max(k, 1)
        if pinned:
            g.prunable = False
            g.meta["fixed"] = True
            g.reason = "touches a model input, an unused output or an op modelpress cannot follow"
        elif at_output:
            g.prunable = False
            g.reason = "changes the model's output width (remove with force=True)"
        elif len(units) < 2 and kind != "embedding":
            g.prunable = False
            g.reason = "a single unit"
        groups.append(g)
    groups.sort(key=lambda g: (_scope_key(g.scope), g.kind))
    seen: dict[str, int] = {}
    for g in groups:
        base = f"{g.kind}:{g.scope}" if g.scope else g.kind
        n = seen.get(base, 0)
        seen[base] = n + 1
        g.name = base if n == 0 else f"{base}#{n}"
    return groups


def without_units(
    groups: list[Group], removed: dict[str, list[int]], drop: dict[Slot, np.ndarray], sizes: dict[Slot, int]
) -> list[Group]:
    """Groups after removing ``removed[name]`` units, re-indexed without re-tracing.

    ``drop`` holds every removed position per slot and ``sizes`` each slot's length before the
    removal; positions after a removed one shift down, in every group that shares the slot. Names
    and order stay as they were, so group names are stable across removals.
    """
    shift: dict[Slot, np.ndarray] = {}
    kept: dict[Slot, np.ndarray] = {}
    for slot, gone in drop.items():
        keep = np.ones(sizes[slot], dtype=bool)
        keep[gone] = False
        shift[slot] = np.cumsum(keep) - 1
        kept[slot] = keep
    out: list[Group] = []
    for g in groups:
        gone = set(removed.get(g.name, ()))
        # positions removed through another group that overlaps this one (a head width inside a head)
        # leave this group's units too
        units = [
            {slot: (shift[slot][idx[kept[slot][idx]]] if slot in shift else idx) for slot, idx in u.items()}
            for i, u in enumerate(g.units)
            if i not in gone
        ]
        new = Group(g.name, g.kind, g.scope, units, g.prunable, g.reason, dict(g.meta))
        if new.prunable and new.size < 2 and new.kind != "embedding":
            new.prunable = False
            new.reason = "a single unit"
        out.append(new)
    return out


def _scope_key(scope: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in scope.split(".")) if scope else ()


def _owner(param: str, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(param.rsplit(".", 1)[0] if "." in param else "")


def _classify(slots: list[Slot], head: bool, modules: dict[str, nn.Module]) -> str:
    if head:
        return "head"
    owners = [(_owner(p, modules), p, a) for p, a in slots]
    # an embedding's width (axis 1) or a norm's weight: the residual stream (an embedding's rows,
    # addressed by token ids, are a vocabulary, not a width)
    if any(
        isinstance(m, nn.Embedding) and a == 1
        or isinstance(m, nn.LayerNorm)
        or type(m).__name__.endswith(("LayerNorm", "RMSNorm"))
        for m, _, a in owners
    ):
        return "embedding"
    if any(isinstance(m, _CONV_TYPES) and a == 0 and p.endswith("weight") for m, p, a in owners):
        return "conv"
    linear_out = [p for m, p, a in owners if a == 0 and p.endswith("weight") and not isinstance(m, _CONV_TYPES)]
    linear_in = [p for m, p, a in owners if a == 1 and p.endswith("weight")]
    if linear_out and linear_in:
        return "mlp"
    return "channel"
