"""ModelGraph: a module, its inputs and its groups of coupled dimensions, with verified edits."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.graph import edit as _edit
from modelpress.graph.groups import Group, build_groups
from modelpress.graph.inputs import InputSpec, PrimaryOutput, primary_output
from modelpress.graph.labels import Propagation, propagate

TRACE_SEQ_LEN = 8
_WRAP = "module."


@dataclass
class Block:
    """A removable block: an item of a ModuleList/Sequential whose output has its input's shape."""

    path: str
    type: str
    params: int


class ModelGraph:
    """Wraps an ``nn.Module`` with its input spec, its provenance (to rebuild it) and its Groups.

    ``source`` says how to rebuild the architecture without pickle (see modelpress.models.build);
    ``edits`` lists structural edits made since (replayed on reload before loading the weights).
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
    ) -> None:
        self.module = module.eval()
        self.input_spec = input_spec
        self.source = source or {"kind": "unknown"}
        self.tokenizer = tokenizer
        self.edits = list(edits or [])
        self.name = name
        self._groups: list[Group] | None = None
        self._propagation: Propagation | None = None
        self._blocks: list[Block] | None = None

    # ----- basics -----
    def copy(self) -> ModelGraph:
        """A deep copy (module included) that edits can change without touching this graph."""
        return ModelGraph(
            copy.deepcopy(self.module),
            self.input_spec,
            copy.deepcopy(self.source),
            tokenizer=self.tokenizer,
            edits=copy.deepcopy(self.edits),
            name=self.name,
        )

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
        return sum(p.numel() for p in self.module.parameters())

    def invalidate(self) -> None:
        self._groups = None
        self._propagation = None
        self._blocks = None

    # ----- discovery -----
    def trace(self) -> torch.export.ExportedProgram:
        """Trace to an aten graph with torch.export (non-strict)."""
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
            ep = self.trace()
            wrapper = self.wrapped()
            state = dict(wrapper.named_parameters())
            state.update(dict(wrapper.named_buffers()))
            prop = propagate(ep, state)
            for s in prop.spaces:
                s.param = s.param[len(_WRAP) :] if s.param.startswith(_WRAP) else s.param
            self._propagation = prop
        return self._propagation

    @property
    def groups(self) -> list[Group]:
        """Groups of coupled dimensions, discovered by tracing and dependency propagation."""
        if self._groups is None:
            self._groups = build_groups(self.propagation, self.module)
        return self._groups

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
        residual = _residual_scopes(self.trace(), shaped)
        # innermost residual blocks only: a stage that contains removable blocks is not itself one
        keep = [p for p in residual if not any(q != p and q.startswith(p + ".") for q in residual)]
        return [
            Block(p, type(candidates[p]).__name__, sum(x.numel() for x in candidates[p].parameters())) for p in keep
        ]

    # ----- edits -----
    def remove(self, group: Group | str, units: list[int] | np.ndarray, *, force: bool = False) -> None:
        """Remove units (by index) of a group, in place; groups are rediscovered afterwards.

        Groups that change the model's output width need ``force=True``; fixed groups never change.
        """
        self.remove_many([(group, units)], force=force)

    def remove_many(self, plan: list[tuple[Group | str, list[int] | np.ndarray]], *, force: bool = False) -> None:
        """Remove units of several groups at once (indices as currently discovered); one re-trace after."""
        resolved: list[tuple[Group, list[int]]] = []
        for group, units in plan:
            g = self.group(group) if isinstance(group, str) else group
            units = sorted({int(u) for u in units})
            if not units:
                continue
            if not g.prunable and (g.meta.get("fixed") or not force):
                raise ValueError(f"group {g.name} cannot be edited: {g.reason}")
            resolved.append((g, units))
        if not resolved:
            return
        self.edits += _edit.remove_units(self.module, resolved)
        self.invalidate()
        self._sync_config()

    def remove_block(self, path: str) -> None:
        """Delete a whole block (must be one of ``self.blocks``), in place."""
        if path not in {b.path for b in self.blocks}:
            raise KeyError(f"{path!r} is not a removable block; blocks: {[b.path for b in self.blocks]}")
        self.edits.append(_edit.delete_block(self.module, path))
        self.invalidate()
        self._sync_config()

    def _sync_config(self) -> None:
        from modelpress.graph.adapters import sync_config

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
        from modelpress.graph.stats import summarize

        return summarize(self)

    def norm_consumers(self) -> list[tuple[str, list[str], bool]]:
        """For each LayerNorm: the Linear modules reading its output directly, and whether anything else does."""
        from modelpress.graph.stats import norm_consumers

        return norm_consumers(self)

    def __repr__(self) -> str:
        return f"ModelGraph({self.name}, {self.num_parameters():,} params, {len(self.edits)} edits)"


def _scope_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path[len(_WRAP) :] if path.startswith(_WRAP) else ("" if path == "module" else path)


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
            tensor_args = [a for a in n.args if isinstance(a, torch.fx.Node)]
            if len(tensor_args) == 2 and any(
                a.name not in names and a.op == "call_function" or a.op == "placeholder" and "args" in a.name
                for a in tensor_args
            ):
                out.append(p)
                break
    return out


def primary(outputs: Any) -> torch.Tensor:
    return primary_output(outputs)
