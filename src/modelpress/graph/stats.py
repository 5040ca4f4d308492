"""Summaries of a ModelGraph: per-block widths, parameters, MACs, and LayerNorm consumers."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from modelpress.graph.family import is_transposed_linear, norm_remainder
from modelpress.graph.groups import Group
from modelpress.graph.inputs import InputSpec


class GraphView(Protocol):
    """What summaries read of a ``ModelGraph`` (``model_graph`` sits above this module and imports it)."""

    name: str
    module: nn.Module
    input_spec: InputSpec

    @property
    def blocks(self) -> list[Any]: ...  # model_graph.Block: path, type, params, removal

    @property
    def groups(self) -> list[Group]: ...

    @property
    def program(self) -> torch.export.ExportedProgram: ...

    def example_inputs(self, batch: int = 1, seq_len: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]: ...

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def wrapped(self) -> nn.Module: ...

    def num_parameters(self) -> int: ...

_FOLLOW = {"dropout", "clone", "contiguous", "alias", "detach", "view", "reshape", "_to_copy", "to"}


def count_macs(graph: GraphView, batch: int = 1, seq_len: int | None = None) -> int:
    """Multiply-accumulates of one forward pass at the default input shape (torch's flop counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = graph.example_inputs(batch, seq_len)
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            graph.forward(inputs)
    except AssertionError:
        # the counter's module tracker hooks the gradients of module inputs, and fails on a parameter passed
        # as a module's input under no_grad (DeBERTa's relative embeddings): count again with autograd on
        counter = FlopCounterMode(display=False)
        with counter:
            graph.wrapped()(*[inputs[n] for n in graph.input_spec.names])
    return int(counter.get_total_flops() // 2)


def output_positions(graph: GraphView, batch: int = 1) -> dict[str, int]:
    """Rows each Linear/conv module computes in one forward at ``batch`` (tokens or output pixels, times the
    batch): what one output unit of it costs in MACs per weight element."""
    found: dict[str, int] = {}
    hooks = []
    for name, mod in graph.module.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            def hook(m: nn.Module, _args: object, out: torch.Tensor, name: str = name) -> None:
                width = m.out_features if isinstance(m, nn.Linear) else m.out_channels
                found[name] = found.get(name, 0) + int(out.numel() // max(1, width))

            hooks.append(mod.register_forward_hook(hook))
    try:
        seq = graph.input_spec.default_seq_len if graph.input_spec.kind == "text" else None
        with torch.no_grad():
            graph.forward(graph.example_inputs(batch, seq))
    finally:
        for h in hooks:
            h.remove()
    return found


def block_widths(graph: GraphView) -> list[dict]:
    """Heads (query heads), key/value heads where fewer, head dim and MLP width of every removable block."""
    rows = []
    for b in graph.blocks:
        inside = [g for g in graph.groups if in_block(g.scope, b.path) or _spans(g, b.path)]
        heads = [g for g in inside if g.kind == "head"]
        mlps = [g for g in inside if g.kind == "mlp"]
        convs = [g for g in inside if g.kind == "conv"]
        row = {"block": b.path, "type": b.type, "params": b.params, "removal": b.removal}
        if heads:
            row["heads"] = sum(g.query_heads for g in heads)
            row["head_dim"] = heads[0].head_dim()
            kv = sum(g.kv_heads for g in heads)
            if kv != row["heads"]:  # grouped-query attention
                row["kv_heads"] = kv
        if mlps:
            row["mlp"] = sum(g.size for g in mlps)
        if convs:
            row["conv_channels"] = [g.size for g in convs]
        rows.append(row)
    return rows


def in_block(scope: str, block: str) -> bool:
    return scope == block or scope.startswith(block + ".")


def _spans(group: Group, block: str) -> bool:
    """Whether a head group of several blocks (heads that share one per-head table) has slices in ``block``."""
    return group.kind in ("head", "head_dim") and in_block(block, group.scope) and any(
        p.startswith(block + ".") for p, _ in group.slots
    )


def embedding_width(graph: GraphView) -> int | None:
    emb = [g for g in graph.groups if g.kind == "embedding"]
    return max((g.size for g in emb), default=None)


def summarize(graph: GraphView) -> dict:
    seq = graph.input_spec.default_seq_len if graph.input_spec.kind == "text" else None
    return {
        "name": graph.name,
        "parameters": graph.num_parameters(),
        "macs": count_macs(graph, 1, seq),
        "input_shape": {"batch": 1, "sequence": seq} if seq else {"batch": 1, "shape": list(graph.input_spec.shape)},
        "embedding_width": embedding_width(graph),
        "blocks": block_widths(graph),
        "groups": [
            {"name": g.name, "kind": g.kind, "units": g.size, "prunable": g.prunable, "reason": g.reason}
            for g in graph.groups
        ],
    }


def norm_consumers(graph: GraphView) -> list[tuple[str, list[str], bool]]:
    """LayerNorm -> Linear consumers (transposed linears such as GPT-2's Conv1D included), found in the
    traced aten graph (through dropout/view-like ops)."""
    ep = graph.program
    sig = ep.graph_signature
    params = dict(sig.inputs_to_parameters)
    modules = dict(graph.wrapped().named_modules())
    out: list[tuple[str, list[str], bool]] = []
    for node in ep.graph_module.graph.nodes:
        if node.op != "call_function" or "layer_norm" not in str(node.target):
            continue
        if len(node.args) < 3 or getattr(node.args[2], "name", None) not in params:
            continue
        ln = params[node.args[2].name].rsplit(".", 1)[0]
        linears: list[str] = []
        other = False
        stack = [(user, node) for user in node.users]
        while stack:
            user, src = stack.pop()
            name = str(getattr(user.target, "overloadpacket", user.target)).split(".")[-1]
            if name in _FOLLOW or "getitem" in name:
                stack.extend((u, user) for u in user.users)
            elif name == "linear" and getattr(user.args[1], "name", None) in params:
                lin = params[user.args[1].name].rsplit(".", 1)[0]
                if isinstance(modules.get(lin), nn.Linear):
                    linears.append(lin.removeprefix("module."))
                else:
                    other = True
            elif name == "addmm" and len(user.args) >= 3 and user.args[1] is src and (
                getattr(user.args[2], "name", None) in params
            ):  # a transposed linear (GPT-2's Conv1D): addmm(bias, x, weight[in, out])
                lin = params[user.args[2].name].rsplit(".", 1)[0]
                if is_transposed_linear(modules.get(lin)):
                    linears.append(lin.removeprefix("module."))
                else:
                    other = True
            else:
                other = True
        out.append((ln.removeprefix("module."), sorted(set(linears)), other))
    return out



_BATCH_NORMS = ("_native_batch_norm_legit_no_training", "batch_norm", "_native_batch_norm_legit")
_FOLDABLE = {"conv2d": nn.Conv2d, "conv1d": nn.Conv1d, "linear": nn.Linear}


def foldable_norms(graph: GraphView) -> list[tuple[str, str]]:
    """(layer, batch norm) pairs where the norm reads only the layer's output and nothing else reads that
    output: a Conv1d/Conv2d or Linear followed by a BatchNorm, the pair that folds exactly into the layer
    (found in the traced aten graph). Pairs whose norm is applied more than once are left out."""
    ep = graph.program
    params = dict(ep.graph_signature.inputs_to_parameters)
    buffers = dict(ep.graph_signature.inputs_to_buffers)
    modules = dict(graph.wrapped().named_modules())
    pairs: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for node in ep.graph_module.graph.nodes:
        name = str(getattr(node.target, "overloadpacket", node.target)).split(".")[-1]
        if node.op != "call_function" or name not in _BATCH_NORMS or len(node.args) < 4:
            continue
        src, running_mean = node.args[0], node.args[3]  # a norm without running statistics does not fold
        if getattr(running_mean, "name", None) not in buffers:
            continue
        norm = buffers[running_mean.name].rsplit(".", 1)[0].removeprefix("module.")
        seen[norm] = seen.get(norm, 0) + 1
        if not isinstance(src, torch.fx.Node) or len(src.users) != 1:
            continue
        kind = str(getattr(src.target, "overloadpacket", src.target)).split(".")[-1]
        layer_weight = src.args[1] if len(src.args) > 1 else None
        if kind not in _FOLDABLE or getattr(layer_weight, "name", None) not in params:
            continue
        layer = params[layer_weight.name].rsplit(".", 1)[0].removeprefix("module.")
        if type(modules.get("module." + layer)) is not _FOLDABLE[kind]:
            continue
        if norm_remainder(modules.get("module." + norm)) is None:
            continue
        pairs.append((layer, norm))
    uses: dict[str, int] = {}
    for layer, _ in pairs:
        uses[layer] = uses.get(layer, 0) + 1
    return [(lay, n) for lay, n in pairs if seen[n] == 1 and uses[lay] == 1]
