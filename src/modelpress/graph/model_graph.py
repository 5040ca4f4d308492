"""ModelGraph: a module, its inputs and its groups of coupled dimensions, with verified edits."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.graph import edit as _edit
from modelpress.graph.adapters import sync_config
from modelpress.graph.dryrun import failing_groups, mark_fixed
from modelpress.graph.family import layer_index_edits
from modelpress.graph.groups import Group, build_groups, without_units
from modelpress.graph.head_dims import check_exact, has_rotary, head_dim_groups
from modelpress.graph.inputs import InputSpec, PrimaryOutput, primary_output
from modelpress.graph.labels import Propagation, propagate
from modelpress.graph.lineage import Lineage, renumber
from modelpress.graph.mapped import (
    drop_mapped_weights,
    drop_tensors,
    dropped_after_use,
    file_mappings_frozen,
    spill_weights,
)
from modelpress.graph.stats import foldable_norms, norm_consumers, summarize
from modelpress.system import release_freed_memory

TRACE_SEQ_LEN = 8
DRY_RUN_FRACTION = 0.3  # share of each group's units a dry run removes before the group is offered
_WRAP = "module."


# how a block goes: deleted from its container (later items renumber), replaced by an identity (the only item
# of its container, whose residual carries the input through), or not at all (alone, and an identity breaks
# the model: its caller passes more arguments or reads more outputs than an identity has)
REMOVALS = {
    "delete": "one of several items of its container: deleted",
    "identity": "alone in its container: replaced by an identity (its residual carries the input)",
    "none": "alone in its container, and an identity in its place breaks the model: kept",
}


@dataclass
class Block:
    """A residual block: an item of a ModuleList/Sequential whose output has its input's shape.

    ``removal`` says how it can go (a key of ``REMOVALS``); ``removable`` is False for "none".
    """

    path: str
    type: str
    params: int
    removal: str = "delete"

    @property
    def container(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def removable(self) -> bool:
        return self.removal != "none"


class ModelGraph:
    """Wraps an ``nn.Module`` with its input spec, its provenance (to rebuild it) and its Groups.

    ``source`` says how to rebuild the architecture without pickle (see modelpress.models.build);
    ``edits`` lists structural edits made since (replayed on reload before loading the weights) and
    every unit removal, permutation and block deletion, from which ``lineage`` is composed.

    Tracing is cached: the exported program, the propagation, the groups and the blocks are computed
    once, carried over by ``copy()``, and re-indexed by unit edits (removal, permutation, slicing);
    only a block deletion (which renumbers modules) or ``invalidate()`` makes the next query re-trace.
    ``lineage_known=False`` marks an edit log written before lineage was recorded.
    """

    def __init__(
        self,
        module: nn.Module,
        input_spec: InputSpec,
        source: dict | None = None,
        *,
        tokenizer: Any = None,
        edits: list[dict] | None = None,
        name: str = "model",
        lineage_known: bool = True,
    ) -> None:
        self.module = module.eval()
        self.input_spec = input_spec
        self.source = source or {"kind": "unknown"}
        self.tokenizer = tokenizer
        self.edits = list(edits or [])
        self.name = name
        self._program: torch.export.ExportedProgram | None = None
        self._groups: list[Group] | None = None
        self._propagation: Propagation | None = None
        self._blocks: list[Block] | None = None
        self._output_shape: tuple[int, ...] | None = None  # primary output at batch 1, as last checked
        self._lineage = Lineage.from_edits(self.edits)
        self._lineage.known = self._lineage.known and lineage_known
        self._shared_versions: dict[int, int] = {}  # copy(share_weights=True): shared storage -> its version then

    # ----- basics -----
    def copy(self, *, share_weights: bool = False) -> ModelGraph:
        """A deep copy (module included) that edits can change without touching this graph.

        Cached discovery comes along (it names parameters, never holds them), so the copy never
        re-traces; the exported program is shared, read-only.

        ``share_weights``: the copy's parameters are new ``nn.Parameter`` objects over this graph's storage (no
        weight bytes are copied; buffers are). Edits replace tensors (``remove_many``, ``remove_blocks``,
        ``add_bias``), so they leave this graph alone, and a pruned copy costs only what it cut anew; anything
        that writes into a parameter in place (training, an in-place refit) must first call
        :meth:`own_weights`, which clones what is still shared.
        """
        memo: dict[int, Any] = {}
        if share_weights:
            for p in self.module.parameters():  # tied parameters once: the tie survives in the copy
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
        out = ModelGraph(
            copy.deepcopy(self.module, memo),
            self.input_spec,
            copy.deepcopy(self.source),
            tokenizer=self.tokenizer,
            edits=copy.deepcopy(self.edits),
            name=self.name,
        )
        out._program = self._program
        out._propagation = copy.deepcopy(self._propagation)
        out._groups = copy.deepcopy(self._groups)
        out._blocks = copy.deepcopy(self._blocks)
        out._output_shape = self._output_shape
        out._lineage = copy.deepcopy(self._lineage)
        if share_weights:  # each shared storage's version at the copy: own_weights checks nothing wrote into it
            out._shared_versions = {_storage(p): p._version for p in memo.values() if isinstance(p, nn.Parameter)}
        return out

    def own_weights(self, original: ModelGraph) -> int:
        """Give every parameter still sharing storage with ``original``'s parameters (a ``copy(share_weights=True)``)
        its own clone, so that in-place writes to this graph no longer reach ``original``. Returns the bytes
        cloned. Raises RuntimeError if a shared parameter was written in place meanwhile (``original`` changed)."""
        theirs = {_storage(p) for p in original.module.parameters()} - {0}
        versions = self._shared_versions
        holders = _edit.tensor_holders(self.module)
        cloned = 0
        # the original's tensors mapped from its checkpoint leave the resident set as each is cloned: the clones
        # grow while the file's pages go, instead of the whole file resident beside the whole copy
        with torch.no_grad(), file_mappings_frozen():
            for name, p in list(self.module.named_parameters()):
                key = _storage(p)
                if key not in theirs:
                    continue
                if key in versions and p._version != versions[key]:  # shared parameters share their version counter
                    raise RuntimeError(f"{name} was written in place while it shared its storage with "
                                       f"{original.name}: the original changed")
                _edit.set_tensor(self.module, name, p.detach().clone(), holders)
                drop_tensors([p])
                cloned += p.numel() * p.element_size()
        self._shared_versions = {}
        return cloned

    def shared_bytes(self, other: ModelGraph) -> int:
        """Bytes of this graph's parameters whose storage ``other``'s parameters also hold."""
        theirs = {_storage(p) for p in other.module.parameters()} - {0}
        return sum(p.numel() * p.element_size() for p in self.module.parameters() if _storage(p) in theirs)

    def drop_mapped_weights(self) -> int:
        """Drop this graph's weights mapped from the checkpoint file from the resident set
        (:func:`modelpress.graph.mapped.drop_mapped_weights`); returns the bytes dropped."""
        return drop_mapped_weights(self.module)

    def spill_weights(self, folder: str | os.PathLike) -> int:
        """Move this graph's weights into files in ``folder``, mapped (:func:`modelpress.graph.mapped.spill_weights`),
        so that :meth:`drop_mapped_weights` can take them off the resident set; returns the bytes spilled."""
        return spill_weights(self.module, folder)

    def example_inputs(self, batch: int = 1, seq_len: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        return self.input_spec.make_torch(batch, seq_len, seed)

    def wrapped(self) -> PrimaryOutput:
        """The module taking positional inputs and returning its primary output tensor (for export)."""
        return PrimaryOutput(self.module, self.input_spec.names)

    @torch.no_grad()
    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.wrapped()(*[inputs[n] for n in self.input_spec.names])

    def state(self) -> dict[str, torch.Tensor]:
        s = dict(self.module.named_parameters())
        s.update(dict(self.module.named_buffers()))
        return s

    def num_parameters(self) -> int:
        """The model's weights: its parameters, plus those that layers holding packed codes in buffers stand for
        (``represented_weights()``: a weight-only layer's ``[out, in]``), a tensor shared by two layers once."""
        n = sum(p.numel() for p in self.module.parameters())
        seen: set[int] = set()
        for m in self.module.modules():
            rep = getattr(m, "represented_weights", None)
            if callable(rep):
                codes, count = rep()
                if id(codes) not in seen:
                    seen.add(id(codes))
                    n += int(count)
        return n

    def invalidate(self) -> None:
        """Forget every cached discovery (call after changing the module outside the graph's edits)."""
        self._program = None
        self._groups = None
        self._propagation = None
        self._blocks = None

    # ----- discovery -----
    @property
    def program(self) -> torch.export.ExportedProgram:
        """The traced aten program of this architecture, traced once and cached.

        Unit edits keep it: its ops, module scopes and parameter names still hold, but its shapes are
        those at tracing time. Use ``trace()`` for a program with the current shapes.
        """
        if self._program is None:
            self._program = self.trace()
        return self._program

    def trace(self) -> torch.export.ExportedProgram:
        """Trace the module as it is now to an aten graph with torch.export (non-strict); not cached."""
        wrapper = self.wrapped().eval()
        inputs = self.example_inputs(1, TRACE_SEQ_LEN if self.input_spec.kind == "text" else None)
        args = tuple(inputs[n] for n in self.input_spec.names)
        try:
            with torch.no_grad():
                return torch.export.export(wrapper, args, strict=False)
        except Exception as exc:  # torch.export raises many types
            raise ModelpressError(
                f"could not trace {self.name} with torch.export: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                "the model's forward must be traceable; file an issue with the architecture",
            ) from exc

    @property
    def propagation(self) -> Propagation:
        if self._propagation is None:
            ep = self.program
            wrapper = self.wrapped()
            # every name of a tied tensor, so that each alias maps to the first (the one edits use)
            state = dict(wrapper.named_parameters(remove_duplicate=False))
            state.update(dict(wrapper.named_buffers(remove_duplicate=False)))
            prop = propagate(ep, state)
            for s in prop.spaces:
                s.param = s.param[len(_WRAP) :] if s.param.startswith(_WRAP) else s.param
            self._propagation = prop
        return self._propagation

    @property
    def groups(self) -> list[Group]:
        """Groups of coupled dimensions, discovered by tracing and dependency propagation."""
        if self._groups is None:
            groups = build_groups(self.propagation, self.module)
            self._dry_run(groups)
            widths = head_dim_groups(groups, has_rotary(self.program))
            self._dry_run(widths)
            check_exact(self, widths)
            self._groups = groups + widths
            release_freed_memory()  # the dry runs' cut copies of the weights, freed inside glibc's heap
        return self._groups

    def _runner(self) -> Callable[[nn.Module], torch.Tensor]:
        """Runs a module of this architecture on fixed example inputs (batch 1), returning its primary output."""
        inputs = self.example_inputs(1, TRACE_SEQ_LEN if self.input_spec.kind == "text" else None)
        args = [inputs[n] for n in self.input_spec.names]
        names = self.input_spec.names

        @torch.no_grad()
        def run(module: nn.Module) -> torch.Tensor:
            return PrimaryOutput(module, names)(*args)

        return run

    def _dry_run(self, groups: list[Group]) -> None:
        """Fix every group whose removal breaks the model (see ``modelpress.graph.dryrun``)."""
        run = self._runner()
        with dropped_after_use(self.module):  # a forward per group: mapped weights resident one layer at a time
            try:
                self._output_shape = tuple(run(self.module).shape)
            except Exception:  # noqa: BLE001 - a module that does not run as is: nothing to compare against
                return
            mark_fixed(groups, failing_groups(self.module, groups, run, DRY_RUN_FRACTION, self._output_shape))

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups: {[g.name for g in self.groups]}")

    def groups_of_kind(self, kind: str, prunable_only: bool = True) -> list[Group]:
        return [g for g in self.groups if g.kind == kind and (g.prunable or not prunable_only)]

    @property
    def blocks(self) -> list[Block]:
        """Removable blocks, found by running the model once with hooks on list/sequence items."""
        if self._blocks is None:
            self._blocks = self._find_blocks()
        return self._blocks

    def _find_blocks(self) -> list[Block]:
        candidates: dict[str, nn.Module] = {}
        for path, mod in self.module.named_modules():
            if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 1:
                kinds = {type(m) for m in mod}
                if len(kinds) != 1:
                    continue
                for i, child in enumerate(mod):
                    n_param_mods = sum(1 for m in child.modules() if any(True for _ in m.parameters(recurse=False)))
                    if n_param_mods >= 2:
                        candidates[f"{path}.{i}" if path else str(i)] = child
        shapes: dict[str, bool] = {}
        hooks = []

        def make_hook(p: str):  # noqa: ANN202
            def hook(_m, args, kwargs, out) -> None:  # noqa: ANN001
                x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
                y = out[0] if isinstance(out, (tuple, list)) else out
                y = getattr(y, "last_hidden_state", y)
                shapes[p] = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape

            return hook

        for p, m in candidates.items():
            hooks.append(m.register_forward_hook(make_hook(p), with_kwargs=True))
        try:
            self.forward(self.example_inputs(1, TRACE_SEQ_LEN if self.input_spec.kind == "text" else None))
        finally:
            for h in hooks:
                h.remove()
        shaped = [p for p in candidates if shapes.get(p)]
        residual = _residual_scopes(self.program, shaped)
        # innermost residual blocks only: a stage that contains removable blocks is not itself one
        keep = [p for p in residual if not any(q != p and q.startswith(p + ".") for q in residual)]
        return [
            Block(p, type(candidates[p]).__name__, sum(x.numel() for x in candidates[p].parameters()), self._removal(p))
            for p in keep
        ]

    def _removal(self, path: str) -> str:
        """How block ``path`` can go now (see ``REMOVALS``): an identity is tried only for a lone block."""
        container, _, idx = path.rpartition(".")
        items = _edit.get_submodule(self.module, container)
        if len(items) > 1:
            return "delete"
        return "identity" if self._identity_runs(items, int(idx)) else "none"

    def _identity_runs(self, items: nn.Module, index: int) -> bool:
        """Whether the model runs, with its output shape, with item ``index`` of ``items`` an identity."""
        expected = self._expected_shape()
        block = items[index]
        items[index] = nn.Identity()
        try:
            return tuple(self._runner()(self.module).shape) == expected
        except Exception:  # noqa: BLE001 - any failure: the caller needs more than an identity gives
            return False
        finally:
            items[index] = block

    def can_remove_blocks(self, paths: list[str]) -> bool:
        """Whether blocks ``paths`` can go together: each is removable and no container loses every item
        (a lone block goes by an identity, which keeps its container's one item)."""
        by_path = {b.path: b for b in self.blocks}
        if any(p not in by_path or not by_path[p].removable for p in paths):
            return False
        deleted: dict[str, int] = {}
        for p in set(paths):
            if by_path[p].removal == "delete":
                deleted[by_path[p].container] = deleted.get(by_path[p].container, 0) + 1
        return all(n < len(_edit.get_submodule(self.module, c)) for c, n in deleted.items())

    # ----- lineage -----
    @property
    def lineage(self) -> dict[str, np.ndarray]:
        """For every group: the ORIGINAL index of each of its current units, composed over all edits.

        Unit ``j`` of group ``name`` is unit ``lineage[name][j]`` of the original model's group
        ``original_name(name)`` (names differ only when a block deletion renumbered the scope).
        """
        if not self._lineage.known:
            raise ModelpressError(
                f"{self.name} was saved before modelpress recorded unit lineage",
                "repeat the edits on the original model to get their lineage",
            )
        return {g.name: self._lineage.units.get(g.name, np.arange(g.size)).copy() for g in self.groups}

    @property
    def block_lineage(self) -> dict[str, np.ndarray]:
        """For every container that lost blocks: the original item index of each current item."""
        return {k: v.copy() for k, v in self._lineage.blocks.items()}

    def original_name(self, group: str) -> str:
        """The name group ``group`` had in the original model (block deletions renumber scopes)."""
        return self._lineage.original_name(group)

    def original_path(self, path: str) -> str:
        """A module or parameter path of this graph in the original model's numbering."""
        return self._lineage.original_path(path)

    def lineage_record(self) -> dict:
        """The recorded (edited) part of the lineage, JSON-ready; unedited groups are the identity."""
        return self._lineage.to_dict()

    def _log(self, records: list[dict]) -> None:
        self.edits += records
        for r in records:
            self._lineage.record(r)

    # ----- edits -----
    def _editable(self, group: Group | str, force: bool) -> Group:
        g = self.group(group) if isinstance(group, str) else group
        if not g.prunable and (g.meta.get("fixed") or not force):
            raise ValueError(f"group {g.name} cannot be edited: {g.reason}")
        return g

    def remove(
        self, group: Group | str, units: list[int] | np.ndarray, *, force: bool = False, check: bool = False
    ) -> None:
        """Remove units (by index) of a group, in place; the other groups are re-indexed, not re-traced.

        Groups that change the model's output width need ``force=True``; fixed groups never change.
        ``check=True`` claims the removal is exact (e.g. the units' weights were zeroed): outputs are
        compared with the graph before the edit, which is restored if they differ (ModelpressError).
        """
        self.remove_many([(group, units)], force=force, check=check)

    def remove_many(
        self,
        plan: list[tuple[Group | str, list[int] | np.ndarray]],
        *,
        force: bool = False,
        check: bool = False,
    ) -> None:
        """Remove units of several groups at once (indices as currently discovered); see ``remove``."""
        resolved: list[tuple[Group, list[int]]] = []
        for group, units in plan:
            g = self._editable(group, force)
            units = sorted({int(u) for u in units})
            if units:
                resolved.append((g, units))
        if not resolved:
            return
        with self._checked("remove", check):
            groups, prop = self.groups, self.propagation
            drop = _edit.unit_positions(resolved)
            sizes = {(s.param, s.axis): s.size for s in prop.spaces}
            records = [
                {"op": "remove_units", "group": g.name, "size": g.size, "units": units} for g, units in resolved
            ]
            expected = None if any(g.meta.get("at_output") for g, _ in resolved) else self._expected_shape()
            saved = _edit.snapshot(self.module)
            attrs = self._edited(saved, resolved)
            self._still_runs(saved, expected, [g.name for g, _ in resolved])
            self._log(records + attrs)
            self._propagation = prop.without(drop)
            self._groups = without_units(groups, {g.name: u for g, u in resolved}, drop, sizes)
            if self._blocks is not None:
                self._blocks = [
                    Block(b.path, b.type, sum(p.numel() for p in self.module.get_submodule(b.path).parameters()),
                          b.removal)
                    for b in self._blocks
                ]
            self._sync_config()

    def _expected_shape(self) -> tuple[int, ...]:
        if self._output_shape is None:
            self._output_shape = tuple(self._runner()(self.module).shape)
        return self._output_shape

    def _edited(self, saved: _edit.Snapshot, plan: list[tuple[Group, list[int]]]) -> list[dict]:
        """Remove units in place; if the edit itself fails half-way, restore ``saved`` before raising."""
        try:
            return _edit.remove_units(self.module, plan)
        except Exception as exc:
            _edit.restore(saved)
            raise ModelpressError(
                f"removing units of {', '.join(g.name for g, _ in plan)} failed on {self.name} ({type(exc).__name__}: "
                f"{(str(exc).strip().splitlines() or [''])[0][:200]}); the edit was undone",
                "leave these groups whole (modelpress inspect shows which groups are fixed and why)",
            ) from exc

    def _still_runs(self, saved: _edit.Snapshot, expected: tuple[int, ...] | None, names: list[str]) -> None:
        """Run the edited module; if it fails (or its output shape changed unasked), restore ``saved`` and raise."""
        try:
            shape = tuple(self._runner()(self.module).shape)
            problem = None if expected is None or shape == expected else f"output shape {expected} -> {shape}"
        except Exception as exc:  # noqa: BLE001 - any failure of the edited model
            problem = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        if problem is None:
            self._output_shape = shape
            return
        _edit.restore(saved)
        raise ModelpressError(
            f"removing units of {', '.join(names)} breaks {self.name} ({problem}); the edit was undone",
            "leave these groups whole (modelpress inspect shows which groups are fixed and why)",
        )

    def permute(self, group: Group | str, order: list[int] | np.ndarray, *, force: bool = False,
                check: bool = False) -> None:
        """Reorder the units of a group in place: unit j becomes the former unit ``order[j]``.

        Exact (every coupled slice moves together; head attributes are untouched), so groups,
        propagation and blocks stay as they are; the lineage follows the permutation. A group at the
        model's output (``force=True``) permutes the output channels too. ``check=True`` verifies that
        outputs are unchanged (ModelpressError and the graph restored if not).
        """
        g = self._editable(group, force)
        order = [int(i) for i in order]
        if order == list(range(g.size)):
            return
        with self._checked("permute", check):
            _edit.permute_units(self.module, g, order)
            self._log([{"op": "permute", "group": g.name, "order": order}])

    def slice(self, group: Group | str, keep: list[int] | np.ndarray, *, force: bool = False,
              check: bool = False) -> None:
        """Keep only units ``keep`` of a group, in that order (remove the rest, then permute)."""
        g = self._editable(group, force)
        keep = [int(u) for u in keep]
        if len(set(keep)) != len(keep) or not all(0 <= u < g.size for u in keep):
            raise ValueError(f"keep must list distinct units of {g.name} (0..{g.size - 1}); got {keep}")
        with self._checked("slice", check):
            drop = sorted(set(range(g.size)) - set(keep))
            self.remove_many([(g.name, drop)], force=force)
            self.permute(g.name, np.searchsorted(np.sort(keep), keep), force=force)

    def add_bias(self, path: str) -> None:
        """Give layer ``path`` (a Linear or convolution without one) a zero bias, in place (recorded, so a saved
        model reloads with it). The function is unchanged; groups are discovered again on the next query (the
        bias joins its layer's output units)."""
        self._log([_edit.add_bias(self.module, path)])
        self._program = None
        self._propagation = None
        self._groups = None

    def remove_block(self, path: str) -> None:
        """Delete a whole block (must be one of ``self.blocks``), in place; later blocks renumber."""
        self.remove_blocks([path])

    def remove_blocks(self, paths: list[str]) -> None:
        """Delete whole blocks (paths as they are now), in place; later blocks renumber. The model's config is
        synced once at the end (one re-trace, not one per block)."""
        known = {b.path: b for b in self.blocks}
        bad = [p for p in paths if p not in known]
        if bad:
            raise KeyError(f"{bad[0]!r} is not a removable block; blocks: {[b.path for b in self.blocks]}")
        if not self.can_remove_blocks(paths):
            raise ModelpressError(
                f"blocks {sorted(set(paths))} cannot go together from {self.name}",
                "keep one item of each container, and the blocks inspect marks as kept",
            )
        order = {b.path: i for i, b in enumerate(self.blocks)}
        for path in sorted(set(paths), key=order.__getitem__, reverse=True):  # later blocks first: paths stay valid
            if known[path].removal == "identity":
                self._skip_block(path)
            else:
                self._delete_block(path)
        if paths:
            self._sync_config()

    def _delete_block(self, path: str) -> None:
        blocks = self.blocks
        record = _edit.delete_block(self.module, path)
        container, _, idx = path.rpartition(".")
        renumbered = layer_index_edits(self.module, container, int(idx))
        for e in renumbered:
            _edit.apply_edit(self.module, e)
        self._log([record, *renumbered])
        # module names changed: re-trace on the next query, but the other blocks are known
        self.invalidate()
        self._blocks = [
            Block(p, b.type, b.params, self._removal(p) if b.container == container else b.removal)
            for b in blocks
            if (p := renumber(b.path, container, int(idx))) is not None
        ]

    def _skip_block(self, path: str) -> None:
        """Replace the lone block ``path`` by an identity (no renumbering); re-trace on the next query."""
        blocks = self.blocks
        self._log([_edit.skip_block(self.module, path)])
        self.invalidate()
        self._blocks = [b for b in blocks if b.path != path]

    def fold_norms(self) -> list[tuple[str, str]]:
        """Fold every BatchNorm that directly follows a Conv/Linear (and reads nothing else) into it, in
        place and exactly (``edit.fold_norm``); logged, so a reload replays it. Returns the folded pairs."""
        pairs = foldable_norms(self)
        if not pairs:
            return []
        self._log([_edit.fold_norm(self.module, layer, norm) for layer, norm in pairs])
        self.invalidate()
        return pairs

    @contextmanager
    def _checked(self, what: str, check: bool) -> Iterator[None]:
        """Run an edit; with ``check``, verify it left the outputs unchanged, else undo it and raise."""
        before = self.copy() if check else None
        yield
        if before is None:
            return
        result = self.verify(before)
        if not result["ok"]:
            self.__dict__.update(before.__dict__)
            raise ModelpressError(
                f"{what} on {self.name} changed the outputs ({result}); the edit was undone",
                "only exact edits can be checked: permutations, or removals of units whose weights are zero",
            )

    def _sync_config(self) -> None:
        sync_config(self)

    # ----- checks and summaries -----
    @torch.no_grad()
    def verify(self, reference: ModelGraph, batch: int = 2, seq_len: int = 16, atol: float = 1e-4) -> dict:
        """Compare outputs with ``reference`` on the same inputs; returns max abs error and cosine."""
        inputs = self.example_inputs(batch, seq_len if self.input_spec.kind == "text" else None, seed=1)
        a = self.forward(inputs).float()
        b = reference.forward(inputs).float()
        if a.shape != b.shape:
            return {"ok": False, "reason": f"shape {tuple(a.shape)} != {tuple(b.shape)}"}
        err = float((a - b).abs().max())
        cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
        return {"ok": err <= atol, "max_abs_err": err, "cosine": cos}

    def summary(self) -> dict:
        """Per block: heads, head dim, MLP width; embedding width; parameters; MACs at the default shape."""
        return summarize(self)

    def norm_consumers(self) -> list[tuple[str, list[str], bool]]:
        """For each LayerNorm: the Linear modules reading its output directly, and whether anything else does."""
        return norm_consumers(self)

    def __repr__(self) -> str:
        return f"ModelGraph({self.name}, {self.num_parameters():,} params, {len(self.edits)} edits)"


def _scope_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path[len(_WRAP) :] if path.startswith(_WRAP) else ("" if path == "module" else path)


# ops that return their input's value (a dtype cast to the same dtype, an alias): a residual read
# through one of them inside the block (Llama's RMSNorm casts its input first) still reads from before it
_SAME_VALUE = ("aten.to.", "aten._to_copy.", "aten.alias.", "aten.clone.", "aten.contiguous.", "aten.detach.")


def _source(node: torch.fx.Node) -> torch.fx.Node:
    while (
        node.op == "call_function"
        and str(node.target).startswith(_SAME_VALUE)
        and node.args
        and isinstance(node.args[0], torch.fx.Node)
    ):
        node = node.args[0]
    return node


def _residual_scopes(ep: torch.export.ExportedProgram, paths: list[str]) -> list[str]:
    """Blocks with a skip connection: an add inside the block that reads a value computed before it."""
    out = []
    nodes = [n for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    scopes = {n.name: _scope_of(n) for n in nodes}
    for p in paths:
        inside = [n for n in nodes if scopes[n.name] == p or scopes[n.name].startswith(p + ".")]
        names = {n.name for n in inside}
        for n in inside:
            if "add" not in str(n.target):
                continue
            tensor_args = [_source(a) for a in n.args if isinstance(a, torch.fx.Node)]
            if len(tensor_args) == 2 and any(
                a.name not in names and a.op == "call_function" or a.op == "placeholder" and "args" in a.name
                for a in tensor_args
            ):
                out.append(p)
                break
    return out


def primary(outputs: Any) -> torch.Tensor:
    return primary_output(outputs)


def _storage(t: torch.Tensor) -> int:
    """The address of a tensor's storage (0 for an empty one): equal for tensors sharing their bytes."""
    return t.untyped_storage().data_ptr() if t.numel() else 0
