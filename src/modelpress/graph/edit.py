"""Structural edits: slice parameters, keep module attributes consistent, delete blocks."""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from modelpress.graph.family import (
    HEAD_WIDTH_ATTRS,
    head_attribute_edits,
    head_dim_attribute_edits,
    norm_remainder,
)
from modelpress.graph.groups import Group, Slot

# edit records that change only which original unit sits where (see modelpress.graph.lineage)
LINEAGE_ONLY = ("remove_units", "permute")


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


Holders = dict[int, list[tuple[nn.Module, str]]]


def tensor_holders(root: nn.Module) -> Holders:
    """For each parameter and buffer (by id): every (module, attribute) holding it (tied tensors: several)."""
    out: Holders = {}
    for m in root.modules():
        for table in (m._parameters, m._buffers):
            for a, t in table.items():
                if t is not None:
                    out.setdefault(id(t), []).append((m, a))
    return out


def set_tensor(root: nn.Module, name: str, value: torch.Tensor, holders: Holders | None = None) -> None:
    """Replace parameter or buffer ``name`` (dotted) by ``value``, keeping its kind.

    Every other name of the same tensor (tied weights: an input embedding shared with the LM head)
    gets the new tensor too, so the tie survives the edit. ``holders`` (``tensor_holders(root)``, for
    many replacements in a row) saves walking the modules for each one.
    """
    mod_path, _, attr = name.rpartition(".")
    mod = get_submodule(root, mod_path)
    old = getattr(mod, attr)
    if holders is None:
        holders = tensor_holders(root)
    where = holders.get(id(old), []) if isinstance(old, torch.Tensor) else []
    if isinstance(old, nn.Parameter):
        new: torch.Tensor = nn.Parameter(value, requires_grad=old.requires_grad)
        where = [(m, a) for m, a in where if a in m._parameters] or [(mod, attr)]
        for m, a in where:
            setattr(m, a, new)
    else:
        new = value
        where = [(m, a) for m, a in where if a in m._buffers] or [(mod, attr)]
        for m, a in where:
            persistent = a not in getattr(m, "_non_persistent_buffers_set", set())
            m.register_buffer(a, value, persistent=persistent)
    holders[id(new)] = where


def sync_module_attrs(root: nn.Module) -> None:
    """Make standard modules' size attributes agree with their (possibly sliced) weights."""
    for mod in root.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = int(w.shape[0]), int(w.shape[1])
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            mod.groups = conv_groups(mod.groups, mod.out_channels, int(w.shape[0]))
            mod.out_channels = int(w.shape[0])
            mod.in_channels = int(w.shape[1]) * mod.groups
        elif isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) and isinstance(mod, nn.LayerNorm):
            mod.normalized_shape = (int(w.shape[0]),) if w.dim() == 1 else tuple(w.shape)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.num_features = int(w.shape[0])
        elif isinstance(mod, nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = int(w.shape[0]), int(w.shape[1])
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # GPT-2 style [in, out] linear
            mod.nf = int(w.shape[1])
        elif hasattr(mod, "normalized_shape") and w.dim() == 1:  # custom LayerNorm classes
            mod.normalized_shape = (int(w.shape[0]),)


_REGISTRIES = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


class Snapshot:
    """A module tree as it was: every module's attributes (mutable containers copied), parameters, buffers and
    children, the version counter of every tensor, and a copy of every buffer's data.

    Edits replace tensors (never write into them), so a shallow record restores them; a forward run in
    between may write into a buffer in place (a BatchNorm's running statistics in training mode, a cache),
    which the buffer copies undo. A parameter written in place cannot be restored and raises.
    """

    def __init__(self, root: nn.Module) -> None:
        self.modules = [
            (m, {k: v if "hooks" in k else _copied(v) for k, v in m.__dict__.items() if k not in _REGISTRIES},
             dict(m._parameters),
             dict(m._buffers), dict(m._modules), set(m._non_persistent_buffers_set))
            for m in root.modules()
        ]
        self.versions = {id(t): (t, t._version) for m in self.modules for t in (*m[2].values(), *m[3].values())
                         if t is not None}
        self.buffers = {id(t): t.detach().clone() for m in self.modules for t in m[3].values() if t is not None}

    def restore(self) -> None:
        """Put every module back as it was, buffers' data included (see the class)."""
        for m, attrs, params, buffers, children, non_persistent in self.modules:
            m.__dict__.clear()
            # torch's hook registries (``_forward_hooks``...) are kept as the same objects, not copied: a handle
            # removes its hook from the dict it was put in, so a copy would keep a hook registered around the edit
            # (a dry run's) on the module forever
            m.__dict__.update({k: v if "hooks" in k else _copied(v) for k, v in attrs.items()})
            m._parameters, m._buffers, m._modules = dict(params), dict(buffers), dict(children)
            m._non_persistent_buffers_set = set(non_persistent)
        with torch.no_grad():
            for key, (t, version) in self.versions.items():
                if t._version == version:
                    continue
                if key not in self.buffers:
                    raise RuntimeError(f"a parameter of shape {tuple(t.shape)} was written in place during an edit")
                t.copy_(self.buffers[key])
                self.versions[key] = (t, t._version)


def _copied(value: object) -> object:
    """A copy of a mutable container (a list of split sizes, a dict of settings); anything else as is."""
    return copy.copy(value) if isinstance(value, (list, dict, set)) else value


def snapshot(root: nn.Module) -> Snapshot:
    """Every module of ``root`` as it is now (see ``Snapshot``)."""
    return Snapshot(root)


def restore(saved: Snapshot) -> None:
    """Put every module of a ``snapshot`` back as it was."""
    saved.restore()


def conv_groups(groups: int, old_out: int, new_out: int) -> int:
    """A grouped convolution's ``groups`` after its output rows went from ``old_out`` to ``new_out``.

    Units of grouped convolutions are whole groups (depthwise: one channel with its output rows), so
    each group keeps its width and the count of groups follows the output rows.
    """
    per_group, rest = divmod(old_out, groups)
    if groups == 1 or rest or not per_group or new_out % per_group:
        return groups
    return new_out // per_group


def refresh_caches(root: nn.Module) -> None:
    """Drop tensors that modules derive from their weights and cache in eval mode.

    Modules that cache (timm's attention-bias caches in LeViT, EfficientFormer, TinyViT, EfficientViT)
    empty their cache when switched to training mode; switching back keeps the module's mode.
    """
    modes = [(m, m.training) for m in root.modules()]
    root.train(True)
    for m, mode in modes:
        m.training = mode


def unit_positions(plan: list[tuple[Group, list[int]]]) -> dict[Slot, np.ndarray]:
    """Every parameter position (per slot) that removing ``plan``'s units takes away."""
    drop: dict[Slot, list[np.ndarray]] = defaultdict(list)
    for group, units in plan:
        bad = [u for u in units if not 0 <= u < group.size]
        if bad:
            raise IndexError(f"group {group.name} has {group.size} units; got {bad}")
        if len(set(units)) >= group.size:
            raise ValueError(f"cannot remove every unit of {group.name}: keep at least one")
        for u in set(units):
            for slot, idx in group.units[u].items():
                drop[slot].append(idx)
    return {slot: np.unique(np.concatenate(parts)) for slot, parts in drop.items()}


def remove_units(root: nn.Module, plan: list[tuple[Group, list[int]]]) -> list[dict]:
    """Remove units of several groups from ``root`` in place, in one slicing pass per parameter.

    Indices are those of the groups as discovered (before any of these removals). Returns the
    attribute edits made (head counts), which the caller records for reloading.
    """
    plan = [(g, units) for g, units in plan if units]
    drop = unit_positions(plan)
    edits = _attribute_edits(root, plan)
    state = dict(root.named_parameters())
    state.update(dict(root.named_buffers()))
    by_param: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for (param, axis), idx in drop.items():
        by_param[param].append((axis, idx))
    holders = tensor_holders(root)
    with torch.no_grad():
        for param, cuts in by_param.items():
            t = state[param].detach()
            for axis, idx in cuts:
                keep = np.setdiff1d(np.arange(t.shape[axis]), idx)
                t = t.index_select(axis, torch.as_tensor(keep, dtype=torch.long))
            set_tensor(root, param, t.contiguous(), holders)
    sync_module_attrs(root)
    for e in edits:
        setattr(get_submodule(root, e["module"]), e["attr"], e["value"])
    refresh_caches(root)
    return edits


def _attribute_edits(root: nn.Module, plan: list[tuple[Group, list[int]]]) -> list[dict]:
    """``setattr`` records for the attention attributes the plan's head and head-width cuts change.

    Where one plan cuts both the heads and the head width of one attention, a total-width attribute
    takes the new heads times the new width (each cut alone would leave the other factor as it was).
    """
    heads_after: dict[str, int] = {}
    width_after: dict[str, int] = {}
    for group, units in plan:
        left = group.size - len(set(units))
        if group.kind == "head":
            heads_after[group.scope] = left * group.heads_per_unit
        elif group.kind == "head_dim":
            width_after[group.scope] = left
    edits: list[dict] = []
    for group, units in plan:
        if group.kind == "head":
            left = group.size - len(set(units))
            edits += head_attribute_edits(
                root,
                group.scope,
                query=(group.query_heads, left * group.heads_per_unit),
                kv=(group.kv_heads, left * group.kv_heads_per_unit),
                head_dim=group.head_dim(),
            )
        elif group.kind == "head_dim":
            reads = [s for s in group.meta.get("input_slots") or [] if s in group.units[0]]
            heads = min(len(group.units[0][s]) for s in (reads or group.units[0]))  # query heads
            edits += head_dim_attribute_edits(
                root, group.scope, heads=heads, old=group.size, new=group.size - len(set(units))
            )
    both = set(heads_after) & set(width_after)
    if not both:
        return edits
    final: dict[tuple[str, str], dict] = {}
    for e in edits:
        scope = next((s for s in both if e["module"] == s or e["module"].startswith(s + ".") or s.startswith(
            e["module"] + ".") or not e["module"]), None)
        if scope is not None and e["attr"] in HEAD_WIDTH_ATTRS:
            e = {**e, "value": heads_after[scope] * width_after[scope]}
        final[(e["module"], e["attr"])] = e
    return list(final.values())


def permute_units(root: nn.Module, group: Group, order: list[int] | np.ndarray) -> None:
    """Reorder the units of ``group`` in place: unit j becomes the former unit ``order[j]``.

    Every coupled slice moves together (rows of the writers, columns of the readers, norms and
    biases), so the function the module computes is unchanged; head-count attributes stay as they are.
    Unit j keeps the positions it had, filled with the values of unit ``order[j]``.
    """
    order = np.asarray(order, dtype=np.int64)
    if sorted(order.tolist()) != list(range(group.size)):
        raise ValueError(f"order must be a permutation of range({group.size}) for {group.name}")
    state = dict(root.named_parameters())
    state.update(dict(root.named_buffers()))
    holders = tensor_holders(root)
    with torch.no_grad():
        for slot in group.slots:
            param, axis = slot
            t = state[param].detach()
            index = np.arange(t.shape[axis])
            for j, src in enumerate(order):
                index[group.units[j][slot]] = group.units[int(src)][slot]
            set_tensor(root, param, t.index_select(axis, torch.as_tensor(index)).contiguous(), holders)


def delete_block(root: nn.Module, path: str) -> dict:
    """Delete block ``path`` (an item of an nn.ModuleList/nn.Sequential) in place; returns its record."""
    parent_path, _, idx = path.rpartition(".")
    parent = get_submodule(root, parent_path)
    if not isinstance(parent, (nn.ModuleList, nn.Sequential)) or not idx.isdigit():
        raise ValueError(f"{path} is not an item of a ModuleList or Sequential")
    if len(parent) <= 1:
        raise ValueError(f"cannot delete the last block of {parent_path}")
    size = len(parent)
    del parent[int(idx)]
    return {"op": "delete_block", "path": path, "size": size}


def skip_block(root: nn.Module, path: str) -> dict:
    """Replace block ``path`` (the only item of its container, residual) by an identity; returns its record."""
    parent_path, _, idx = path.rpartition(".")
    parent = get_submodule(root, parent_path)
    if not isinstance(parent, (nn.ModuleList, nn.Sequential)) or not idx.isdigit():
        raise ValueError(f"{path} is not an item of a ModuleList or Sequential")
    parent[int(idx)] = nn.Identity()
    return {"op": "skip_block", "path": path}


def fold_norm(root: nn.Module, layer: str, norm: str, *, values: bool = True) -> dict:
    """Fold the BatchNorm ``norm`` (in eval form: running statistics) into the Conv/Linear ``layer`` it
    follows, in place, and put an identity where the norm was; returns its record.

    ``W' = W * g / sqrt(var + eps)`` per output channel, ``b' = (b - mean) * g / sqrt(var + eps) + beta``:
    the same function, one op fewer, and per-channel weight scales computed on the folded weights. What
    the norm module did after normalizing (timm's BatchNormAct2d: its activation) stays in its place.
    ``values=False`` (replay on reload) only reshapes the modules; the saved weights are loaded after."""
    mod, bn = get_submodule(root, layer), get_submodule(root, norm)
    remainder = norm_remainder(bn)
    if remainder is None:
        raise ValueError(f"{norm} ({type(bn).__name__}) is not a BatchNorm whose forward is known")
    out = int(mod.weight.shape[0])
    if int(bn.num_features) != out:
        raise ValueError(f"{norm} normalizes {bn.num_features} channels but {layer} writes {out}")
    with torch.no_grad():
        w = mod.weight.detach()
        b = mod.bias.detach() if mod.bias is not None else torch.zeros(out, dtype=w.dtype)
        if values:
            var = bn.running_var if bn.running_var is not None else torch.ones(out)
            mean = bn.running_mean if bn.running_mean is not None else torch.zeros(out)
            gamma = bn.weight.detach() if bn.weight is not None else torch.ones(out)
            beta = bn.bias.detach() if bn.bias is not None else torch.zeros(out)
            k = (gamma.double() / torch.sqrt(var.double() + bn.eps))
            w = (w.double() * k.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
            b = ((b.double() - mean.double()) * k + beta.double()).to(w.dtype)
        mod.weight = nn.Parameter(w.clone(), requires_grad=mod.weight.requires_grad)
        mod.bias = nn.Parameter(b.clone(), requires_grad=mod.weight.requires_grad)
    parent_path, _, child = norm.rpartition(".")
    setattr(get_submodule(root, parent_path), child, remainder)
    return {"op": "fold_norm", "layer": layer, "norm": norm}


BIAS_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def add_bias(root: nn.Module, path: str) -> dict:
    """Give layer ``path`` (a Linear or convolution without a bias) a zero bias, in place; returns its record.

    The function is unchanged; a later refit can then shift the layer's outputs (reconstruction's bias
    compensation)."""
    mod = get_submodule(root, path)
    if not isinstance(mod, BIAS_TYPES) or getattr(mod, "bias", None) is not None:
        raise ValueError(f"{path} is not a Linear or convolution without a bias")
    w = mod.weight
    mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)
    return {"op": "add_bias", "module": path, "size": int(w.shape[0])}


def apply_edit(root: nn.Module, edit: dict) -> None:
    """Replay one recorded structural edit (used when reloading a saved model)."""
    if edit["op"] in LINEAGE_ONLY:
        return  # the saved weights already carry these; they are replayed for the lineage only
    if edit["op"] == "delete_block":
        delete_block(root, edit["path"])
    elif edit["op"] == "skip_block":
        skip_block(root, edit["path"])
    elif edit["op"] == "fold_norm":
        fold_norm(root, edit["layer"], edit["norm"], values=False)
    elif edit["op"] == "add_bias":
        add_bias(root, edit["module"])
    elif edit["op"] == "setattr":
        setattr(get_submodule(root, edit["module"]), edit["attr"], edit["value"])
    else:
        raise ValueError(f"unknown edit {edit['op']!r}")
