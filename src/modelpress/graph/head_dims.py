"""Head-width groups (NViT's head alignment): dimension d of every head of one attention, removed together.

A unit of a ``head_dim`` group is one index d inside the heads: the d-th query and key row of every
head (so ``q . k`` loses the same term in every head), the d-th value row and the matching column of
the output projection. Removing it keeps every head the same width, which is what reshaping attention
implementations need ("head alignment").

The group is derived from the traced head group: within one head unit, each parameter slot holds its
positions sorted, in blocks of ``head_dim`` (one block per query head, or per q/k/v part of a fused
projection), and dimension d is the d-th position of every block. Slots with one position per head (a
per-head bias table) have no head-width axis and are left out.

Ties: every attention modelpress follows reshapes q, k and v by one head size, so the query/key width
and the value width are one group (``meta["ties"]``); no family gets separate QK and V groups.
Rotary models get no head-width group: their position tables pair dimensions d and d + head_dim / 2.
The attention's scale is never changed: the models modelpress follows store it at init
(``scaling = head_dim ** -0.5``, timm's ``scale``), and keeping the trained scale is what makes removing
zeroed dimensions exact. A model that recomputes it from the head size in its forward gets a new scale
after a cut: :func:`check_exact` finds those groups when the graph is built (``meta["exact"] = False``,
with the reason); they stay prunable, since pruning is lossy anyway and recovery training absorbs it.

Lineage: a head-width group overlaps its head group (``meta["overlaps"]``). Unit lineage stays per
group: after a width cut, head j holds its original head's positions at the dimensions the head-width
group's lineage keeps.
"""

from __future__ import annotations

import numpy as np
import torch

from modelpress.graph import edit as _edit
from modelpress.graph.groups import Group
from modelpress.graph.run import PrimaryOutput

TIES = "query/key and value widths are one group: the attention reshapes q, k and v by one head size"


def has_rotary(program: torch.export.ExportedProgram) -> bool:
    """Whether the traced model computes position tables with cos/sin (rotary embeddings)."""
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function" and str(node.target).split(".")[1:2] in (["cos"], ["sin"]):
            return True
    return False


def head_dim_groups(groups: list[Group], rotary: bool) -> list[Group]:
    """One ``head_dim`` group per head group whose units split into head-width blocks."""
    if rotary:
        return []
    out = []
    for g in groups:
        if g.kind != "head" or not g.units:
            continue
        units = _split(g)
        if units is None:
            continue
        hd = Group(f"head_dim:{g.scope}" if g.scope else "head_dim", "head_dim", g.scope, units)
        hd.meta.update({"heads_group": g.name, "ties": TIES, "overlaps": g.name, "at_output": g.meta.get("at_output", False),
                        "input_slots": g.meta.get("input_slots")})
        if g.meta.get("fixed") or g.meta.get("at_output"):
            hd.prunable, hd.reason = False, g.reason
            hd.meta["fixed"] = bool(g.meta.get("fixed"))
        elif len(units) < 2:
            hd.prunable, hd.reason = False, "a single unit"
        out.append(hd)
    return out


def _split(group: Group) -> list[dict] | None:
    width = group.head_dim()
    if width < 1:
        return None
    slots: dict = {}
    for slot in group.slots:
        lengths = {len(u[slot]) for u in group.units}
        if len(lengths) != 1:
            return None
        n = lengths.pop()
        if n < width:
            continue  # one entry per head (a bias table): no head-width axis
        if n % width:
            return None
        slots[slot] = n // width
    if not slots:
        return None
    units = []
    for d in range(width):
        unit = {}
        for slot, blocks in slots.items():
            unit[slot] = np.sort(np.concatenate([
                np.asarray(u[slot])[b * width + d : b * width + d + 1] for u in group.units for b in range(blocks)
            ]))
        units.append(unit)
    return units


RESCALES = "the attention recomputes its scale from the head size, so a width cut rescales the scores"


def check_exact(graph, groups: list[Group]) -> None:  # noqa: ANN001
    """Mark each head-width group whose zeroed-unit removal is not exact (``meta["exact"]``).

    One probe for all groups: on a copy, zero dimension 0 of every group and remove it; if the output
    moved, test the groups one by one.
    """
    todo = [g for g in groups if g.kind == "head_dim" and g.prunable and g.size > 1]
    for g in groups:
        if g.kind == "head_dim":
            g.meta["exact"] = True
    if not todo:
        return
    bad = _inexact(graph, todo)
    if len(bad) > 0 and len(todo) > 1:
        bad = [g for g in todo if _inexact(graph, [g])]
    for g in bad:
        g.meta["exact"] = False
        g.meta["note"] = RESCALES


def _inexact(graph, todo: list[Group]) -> list[Group]:  # noqa: ANN001
    """On the graph's own module, edited and put back (no copy of the model): zero unit 0 of every group
    in ``todo``, run, remove those units, run again; every group if the output moved. The zeroed weights are
    new tensors put in place of the touched ones (never written into: a pruned copy may share its weights
    with the original, ``ModelGraph.copy(share_weights=True)``), and the module's own tensors are put back."""
    module = graph.module
    inputs = graph.example_inputs(1, 8 if graph.input_spec.kind == "text" else None, seed=2)
    names = graph.input_spec.names
    untouched = _edit.snapshot(module)
    try:
        with torch.no_grad():
            holders = _edit.tensor_holders(module)
            for g in todo:
                params = dict(module.named_parameters())
                for (p, axis), idx in g.units[0].items():
                    if p in params:
                        zeroed = params[p].detach().index_fill(axis, torch.as_tensor(idx, dtype=torch.long), 0.0)
                        _edit.set_tensor(module, p, zeroed, holders)
                        params[p] = dict(module.named_parameters())[p]
            before = PrimaryOutput(module, names)(*[inputs[n] for n in names])
            for e in _edit.remove_units(module, [(g, [0]) for g in todo]):
                del e
            after = PrimaryOutput(module, names)(*[inputs[n] for n in names])
    finally:
        _edit.restore(untouched)
        _edit.refresh_caches(module)  # nothing derived from the zeroed weights stays cached
    scale = float(before.abs().max()) + 1e-6
    return list(todo) if float((after - before).abs().max()) > 1e-4 * scale else []
