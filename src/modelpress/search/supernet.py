"""The elastic super-network: a pretrained ModelGraph whose units are re-ordered by saliency, so that every
sub-network takes the leading units of each group (nested weights, as in MatFormer and once-for-all).

* ``SuperNet.from_graph`` copies the graph and permutes every searched group (heads, MLP units, head
  dims, residual channels) by descending saliency (``modelpress.data.saliency.group_saliency``): exact, the
  re-ordered model computes what the original does.
* ``forward(config, inputs)`` runs a sub-network inside the super-network by masking: the parameters of
  dropped units are multiplied by zero (``torch.func.functional_call``, so gradients reach the kept
  ones), skipped blocks pass their input through, and LayerNorms over the residual stream normalize the
  kept channels only. It equals the extracted sub-network (up to float rounding).
* ``extract(config)`` slices a copy with the graph's own edits (``remove_many``, ``remove_block``): a dense
  standalone ModelGraph that export, bench, quantize and save treat like any other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from modelpress.data.saliency import group_saliency
from modelpress.errors import ModelpressError
from modelpress.graph import Group, ModelGraph
from modelpress.graph.inputs import primary_output
from modelpress.progress import QUIET, Reporter
from modelpress.search.space import SearchSpace


class SuperNet:
    """A re-ordered graph and its search space; see the module docstring."""

    def __init__(self, graph: ModelGraph, space: SearchSpace) -> None:
        self.graph = graph
        self.space = space

    # ----- construction
    @classmethod
    def from_graph(
        cls,
        graph: ModelGraph,
        space: SearchSpace,
        *,
        saliency: str = "magnitude",
        data: Any = None,
        task: Any = None,
        max_batches: int | None = 4,
        seed: int = 0,
        reporter: Reporter = QUIET,
    ) -> SuperNet:
        """Copy ``graph`` and order each searched group's units by ``saliency`` (most salient first).

        Gradient criteria (``hessian``, ``taylor``) need ``data`` (a DataSplit) and ``task``."""
        net = graph.copy()
        groups = [net.group(n) for n in searched_groups(space)]
        with reporter.step(f"ordering {len(groups)} groups by {saliency} saliency"):
            scores = group_saliency(net, saliency, groups=groups, data=data, task=task, max_batches=max_batches,
                                    seed=seed)
        for g in groups:
            order = np.argsort(-np.asarray(scores[g.name]), kind="stable")
            net.permute(g.name, order)
        return cls(net, space)

    # ----- the cuts a config makes
    def cuts(self, config: dict[str, Any]) -> list[tuple[Group, int]]:
        """(group, units kept) for every searched group the config narrows."""
        self.space.check(config)
        out: list[tuple[Group, int]] = []
        for b, row in zip(self.space.blocks, config["blocks"], strict=True):
            for gname, key in ((b.head_group, "heads"), (b.mlp_group, "mlp"), (b.head_dim_group, "head_dim")):
                if gname is not None and key in row:
                    g = self.graph.group(gname)
                    if row[key] < g.size:
                        out.append((g, int(row[key])))
        embed = config.get("embed")
        if embed:
            for gname in self.space.embed_groups:
                g = self.graph.group(gname)
                if embed < g.size:
                    out.append((g, int(embed)))
        return out

    def skipped(self, config: dict[str, Any]) -> list[str]:
        return [b.path for b, row in zip(self.space.blocks, config["blocks"], strict=True) if not row.get("keep", True)]

    # ----- extraction
    def extract(self, config: dict[str, Any]) -> ModelGraph:
        """The sub-network as a dense standalone ModelGraph (a sliced copy; the super-network is untouched)."""
        sub = self.graph.copy()
        plan = [(g.name, list(range(k, g.size))) for g, k in self.cuts(config)]
        if plan:
            sub.remove_many(plan)
        sub.remove_blocks(self.skipped(config))
        sub.name = f"{self.graph.name}-sub"
        return sub

    # ----- masked forward
    def masks(self, config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per parameter or buffer the config narrows: a 0/1 mask of its shape (0 on dropped units)."""
        state = self.graph.state()
        out: dict[str, torch.Tensor] = {}
        for g, k in self.cuts(config):
            for unit in g.units[k:]:
                for (param, axis), idx in unit.items():
                    t = state[param]
                    if not t.is_floating_point():
                        continue
                    if param not in out:
                        out[param] = torch.ones(t.shape, dtype=t.dtype, device=t.device)
                    out[param].index_fill_(axis, torch.as_tensor(idx, dtype=torch.long, device=t.device), 0.0)
        return out

    def masked_module_call(self, config: dict[str, Any], inputs: dict[str, torch.Tensor],
                           masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The primary output of the sub-network ``config`` run inside the super-network (differentiable)."""
        module = self.graph.module
        masks = self.masks(config) if masks is None else masks
        tensors = dict(module.named_parameters())
        tensors.update(dict(module.named_buffers()))
        swapped = {name: tensors[name] * m for name, m in masks.items()}
        with self._hooks(config):
            out = functional_call(module, swapped, args=(), kwargs=_kwargs(module, inputs, self.graph), strict=False)
        return primary_output(out)

    @torch.no_grad()
    def forward(self, config: dict[str, Any], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``masked_module_call`` without gradients, in eval mode."""
        was = self.graph.module.training
        self.graph.module.eval()
        try:
            return self.masked_module_call(config, inputs)
        finally:
            self.graph.module.train(was)

    @contextmanager
    def _hooks(self, config: dict[str, Any]) -> Iterator[None]:
        handles = []
        for path in self.skipped(config):
            handles.append(self.graph.module.get_submodule(path).register_forward_hook(_pass_through, with_kwargs=True))
        embed = config.get("embed")
        if embed:
            for norm in self._residual_norms(embed):
                handles.append(norm.register_forward_hook(_narrow_norm(embed)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _residual_norms(self, embed: int) -> list[nn.Module]:
        """LayerNorms over the residual stream (their weight is in an embedding group)."""
        full = min(self.graph.group(n).size for n in self.space.embed_groups)
        if embed >= full:
            return []
        params = {p for n in self.space.embed_groups for p, _ in self.graph.group(n).slots}
        norms = []
        for name, m in self.graph.module.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and f"{name}.weight" in params and w.dim() == 1 and not isinstance(m, nn.Linear):
                if not isinstance(m, nn.LayerNorm):
                    raise ModelpressError(
                        f"masking the residual width through {type(m).__name__} ({name}) is not supported",
                        "search the residual width by extraction only, or leave embed out of the space",
                    )
                norms.append(m)
        return norms


def searched_groups(space: SearchSpace) -> list[str]:
    names = []
    for b in space.blocks:
        names += [g for g in (b.head_group, b.mlp_group, b.head_dim_group) if g is not None]
    return names + list(space.embed_groups)


def _kwargs(module: nn.Module, inputs: dict[str, torch.Tensor], graph: ModelGraph) -> dict[str, torch.Tensor]:
    names = list(graph.input_spec.names)
    from modelpress.graph.run import accepts_kwarg

    if len(names) == 1 and not accepts_kwarg(module, names[0]):
        # forward(self, x): functional_call takes kwargs only by name; find the parameter's name
        import inspect

        first = next(iter(inspect.signature(module.forward).parameters))
        return {first: inputs[names[0]]}
    return {n: inputs[n] for n in names if n in inputs}


def _pass_through(_module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
    """A skipped block returns its input (in the structure of its output)."""
    x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    if isinstance(out, tuple):
        return (x, *out[1:])
    return x


def _narrow_norm(embed: int) -> Any:
    def hook(m: nn.LayerNorm, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        y = torch.nn.functional.layer_norm(
            x[..., :embed], (embed,), None if m.weight is None else m.weight[:embed],
            None if m.bias is None else m.bias[:embed], m.eps,
        )
        return torch.cat([y, torch.zeros_like(x[..., embed:])], dim=-1)

    return hook

