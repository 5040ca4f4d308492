"""Which original input columns and output rows each layer of a pruned graph kept, from the unit lineage.

A pruned ``ModelGraph`` knows, for every group, the original unit behind each current one
(``ModelGraph.lineage``, composed over its edit log) and, for every unit, the parameter positions it owns
(``Group.units``). Walking the pruned graph's groups against the original's gives, for every parameter
axis a group touches, the original position of each current position; a layer whose input axis is not the
identity lost (or reordered) input channels and is a reader to refit.

``original`` may itself be an edited graph (an earlier pass of a recipe): both lineages go back to the same
unedited model, so positions are matched through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from modelpress.graph import ModelGraph
from modelpress.reconstruct.layers import input_axis, output_axis, skip_reason

__all__ = ["LayerMap", "layer_map"]


@dataclass
class LayerMap:
    """One reader layer: its path in the original graph, the original input channel behind each of its current
    input channels (``inputs``) and the original output unit behind each current output (``outputs``)."""

    original: str
    inputs: np.ndarray
    outputs: np.ndarray


Slot = tuple[str, int]


def _positions(original: ModelGraph, pruned: ModelGraph) -> dict[Slot, np.ndarray]:
    """For every (pruned parameter, axis) some group covers: the original-graph position of each current one
    (-1 where the groups do not say).

    A position may lie in several groups' units (a head and a head width overlap): its original position is
    in the intersection of the original positions of all of them. Positions covered by the same units are
    matched to that intersection in order (removal keeps the order inside a unit)."""
    # the original graph's groups by their unedited name, with the unedited index of each of their units
    by_root: dict[str, tuple] = {}
    orig_lineage = original.lineage
    for g in original.groups:
        where = {int(u): i for i, u in enumerate(orig_lineage[g.name])}
        by_root[original.original_name(g.name)] = (g, where)
    orig_params = {original.original_path(n): n for n, _ in original.module.named_parameters()}
    sizes = {n: p.shape for n, p in pruned.module.named_parameters()}
    cover: dict[Slot, list[list[int]]] = {}  # per slot and current position: the unit keys covering it
    origin: dict[int, np.ndarray] = {}  # unit key -> its original positions on that slot
    lineage = pruned.lineage
    for g in pruned.groups:
        found = by_root.get(pruned.original_name(g.name))
        if found is None:
            continue
        og, where = found
        for j, unit in enumerate(g.units):
            src = where.get(int(lineage[g.name][j]))
            if src is None:
                continue
            for (param, axis), idx in unit.items():
                oparam = orig_params.get(pruned.original_path(param))
                if oparam is None or param not in sizes or (oparam, axis) not in og.units[src]:
                    continue
                key = len(origin)
                origin[key] = np.asarray(og.units[src][(oparam, axis)])
                if (param, axis) not in cover:
                    cover[(param, axis)] = [[] for _ in range(sizes[param][axis])]
                lists = cover[(param, axis)]
                for p in np.asarray(idx).tolist():
                    lists[p].append(key)
    out: dict[Slot, np.ndarray] = {}
    for slot, lists in cover.items():
        pos = np.full(len(lists), -1, dtype=np.int64)
        by_sig: dict[tuple[int, ...], list[int]] = {}
        for p, keys in enumerate(lists):
            if keys:
                by_sig.setdefault(tuple(keys), []).append(p)
        for keys, current in by_sig.items():
            candidates = origin[keys[0]]
            for k in keys[1:]:
                candidates = np.intersect1d(candidates, origin[k])
            candidates = np.sort(candidates)
            if len(candidates) == len(current):
                pos[current] = candidates
        out[slot] = pos
    return out


def _axis_map(positions: dict[Slot, np.ndarray], param: str, axis: int, size: int, orig_size: int) -> np.ndarray | None:
    """The original position of each current position of ``param``'s ``axis``; None if unknown."""
    pos = positions.get((param, axis))
    if pos is None:
        return np.arange(size) if size == orig_size else None
    return None if (pos < 0).any() else pos


def layer_map(original: ModelGraph, pruned: ModelGraph, every: bool = False,
              ) -> tuple[dict[str, LayerMap], dict[str, str]]:
    """The reader layers of ``pruned`` (modules whose input channels are not the original's, in module order)
    with their maps, and the layers skipped with a reason (a kind that cannot be refit, an unknown map).
    ``every``: every refittable layer, the ones that read all their original inputs too (their inputs still
    drift when earlier layers were pruned: refit sequentially, they absorb that drift, as ZipLM and GPTQ refit
    every layer)."""
    positions = _positions(original, pruned)
    orig_modules = {original.original_path(n): (n, m) for n, m in original.module.named_modules()}
    readers: dict[str, LayerMap] = {}
    skipped: dict[str, str] = {}
    holders: dict[int, int] = {}
    for m in pruned.module.modules():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    for name, mod in pruned.module.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() < 2 or isinstance(mod, nn.Embedding):
            continue  # an embedding's width is what it writes, not what it reads
        found = orig_modules.get(pruned.original_path(name))
        if found is None:
            continue
        oname, omod = found
        ow = getattr(omod, "weight", None)
        if not isinstance(ow, nn.Parameter) or ow.dim() != w.dim():
            continue
        ia, oa = input_axis(mod), output_axis(mod)
        ins = _axis_map(positions, f"{name}.weight", ia, w.shape[ia], ow.shape[ia])
        if ins is not None and np.array_equal(ins, np.arange(ow.shape[ia])) and not every:
            continue  # reads every original input channel, in order: not a reader of removed units
        reason = skip_reason(mod)
        if reason is None and holders.get(id(w), 0) > 1:
            reason = "its weight is tied to another module's (an embedding): a refit would change both"
        outs = _axis_map(positions, f"{name}.weight", oa, w.shape[oa], ow.shape[oa])
        if reason is None and (ins is None or outs is None):
            reason = "the lineage does not say which original channels it kept"
        if reason is not None:
            skipped[name] = reason
            continue
        readers[name] = LayerMap(oname, ins, outs)
    return readers, skipped
