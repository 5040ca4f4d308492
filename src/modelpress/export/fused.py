"""ONNX Runtime's fused decoder ops in the cached decoder: ``com.microsoft.GroupQueryAttention`` (the cache
concatenation, grouped key/value heads, the causal and padding masks and softmax in one kernel) and
``com.microsoft.RotaryEmbedding``, the ops ONNX Runtime GenAI's model builder emits.

They are emitted at trace time the way the MatMulNBits lowering emits its contrib op: autograd functions whose
forward is the op's reference semantics in torch (so tracing sees the right shapes, and a test can compare
them with Hugging Face's attention) and whose ONNX symbolic is the contrib op. ``fused_attention`` swaps the
forward of every attention module that an *adapter* recognises (family facts live in the adapters: which
projections, packed or not, rotary or learned positions, how the module returns) for one that calls these
ops, and reads the past key/values and writes the present ones through a ``FusedState`` the decoder wrapper
fills (``export.decoder.FusedDecoder``), so Hugging Face's cache and mask code stays out of the graph (the
tracer drops it as dead code). A module no adapter covers (sliding windows, partial rotary, per-head norms,
cross attention, ...) makes ``attention_adapters`` return None: the export then keeps the plain-op graph.

Semantics kept exact against Hugging Face's eager attention, left padding included: every cache row is
stored (pads too, as Hugging Face's cache does), ``seqlens_k`` is ``total - 1`` for every row, and padded
keys are masked by an additive ``attention_bias`` built once per step from ``attention_mask``. Rotary
embeddings are GroupQueryAttention's own (``do_rotary``, as GenAI's builder emits them: no RotaryEmbedding
nodes), with cos/sin caches read from the model's own rotary module at every position (so its scaling variants
come along). The kernel places a row's new tokens at ``past .. past + S - 1``, counting the pads of a
left-padded row, where Hugging Face's ``position_ids`` skip them: a shift that is the same for every token of
the row, and rotary attention depends only on position differences, so the outputs agree (tests compare
left-padded greedy generation with torch's). A packed q|k|v projection feeds the kernel packed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["FusedState", "attention_adapters", "attention_inputs", "drop_empty_inputs", "fuse_skip_norms", "fused_attention",
           "group_query_attention", "norm_adapters", "pack_attention_inputs", "simplified_layer_norm"]

# GroupQueryAttention's optional inputs this export leaves absent: traced as an empty tensor, then cleared
OPTIONAL_INPUTS = {"GroupQueryAttention": (1, 2, 7, 8, 9)}


def _empty(g: Any) -> Any:
    return g.op("Constant", value_t=torch.zeros(0))


# ------------------------------------------------------------------------------------------------- ops


class _GroupQueryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
                past_key: torch.Tensor, past_value: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor,
                bias: torch.Tensor, num_heads: int, kv_heads: int, scale: float, cos_cache: torch.Tensor | None,
                sin_cache: torch.Tensor | None) -> tuple:
        batch, seq = query.shape[:2]
        head = past_key.shape[-1]
        if key is None:  # packed QKV
            query, key, value = query.split([num_heads * head, kv_heads * head, kv_heads * head], dim=-1)
        q = query.reshape(batch, seq, num_heads, head).transpose(1, 2)
        key = key.reshape(batch, seq, kv_heads, head).transpose(1, 2)
        if cos_cache is not None:  # the kernel's own rotary: the new tokens sit at past .. past + seq - 1
            pos = torch.arange(past_key.shape[2], past_key.shape[2] + seq, device=q.device)
            q, key = _rotate_half(q, cos_cache[pos], sin_cache[pos]), _rotate_half(key, cos_cache[pos], sin_cache[pos])
        k = torch.cat([past_key, key], dim=2)
        v = torch.cat([past_value, value.reshape(batch, seq, kv_heads, head).transpose(1, 2)], dim=2)
        groups = num_heads // kv_heads
        kk, vv = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ kk.transpose(-1, -2)) * scale + bias
        past = k.shape[2] - seq
        causal = torch.arange(k.shape[2], device=q.device)[None, :] > (past + torch.arange(seq, device=q.device))[:, None]
        scores = scores.masked_fill(causal, torch.finfo(scores.dtype).min)
        out = (scores.softmax(-1) @ vv).transpose(1, 2).reshape(batch, seq, num_heads * head)
        return out, k, v

    @staticmethod
    def symbolic(g: Any, query: Any, key: Any, value: Any, past_key: Any, past_value: Any, seqlens_k: Any,
                 total: Any, bias: Any, num_heads: int, kv_heads: int, scale: float, cos_cache: Any,
                 sin_cache: Any) -> Any:
        absent = _empty(g)
        key = absent if key is None or _is_none(key) else key
        value = absent if value is None or _is_none(value) else value
        rotary = cos_cache is not None and not _is_none(cos_cache)
        cos, sin = (cos_cache, sin_cache) if rotary else (absent, absent)
        out = g.op("com.microsoft::GroupQueryAttention", query, key, value, past_key, past_value, seqlens_k, total,
                   cos, sin, absent, bias, num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale,
                   do_rotary_i=int(rotary), outputs=3)
        with contextlib.suppress(Exception):  # the outputs' types for the exporter's shape inference
            b, s = query.type().varyingSizes()[:2]
            head = past_key.type().varyingSizes()[3]
            out[0].setType(query.type().with_sizes([b, s, num_heads * head]))
            for o in out[1:]:
                o.setType(past_key.type().with_sizes([b, kv_heads, None, head]))
        return out


class _AttentionInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, attention_mask: torch.Tensor, input_ids: torch.Tensor, dtype: torch.dtype) -> tuple:
        batch, total = attention_mask.shape
        seqlens_k = torch.full((batch,), total - 1, dtype=torch.int32, device=attention_mask.device)
        total_t = torch.full((1,), total, dtype=torch.int32, device=attention_mask.device)
        bias = torch.where(attention_mask.bool(), 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
        bias = bias.expand(-1, -1, input_ids.shape[1], -1)
        return seqlens_k, total_t, bias

    @staticmethod
    def symbolic(g: Any, attention_mask: Any, input_ids: Any, dtype: torch.dtype) -> Any:
        def const(value: Any, dtype: torch.dtype = torch.int64) -> Any:
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        total64 = g.op("Shape", attention_mask, start_i=1, end_i=2)  # [1]: past + new
        total = g.op("Cast", total64, to_i=6)  # int32
        batch = g.op("Shape", attention_mask, start_i=0, end_i=1)
        seqlens_k = g.op("Expand", g.op("Sub", total, const([1], torch.int32)), batch)  # every row: total - 1
        keep = g.op("Cast", attention_mask, to_i=9)  # bool
        bias = g.op("Where", keep, const(0.0, dtype), const(torch.finfo(dtype).min, dtype))
        bias = g.op("Unsqueeze", bias, const([1, 2]))  # [B, 1, 1, T]
        # GroupQueryAttention (ONNX Runtime 1.32) wants the bias's third axis equal to the new tokens': no broadcast
        seq = g.op("Shape", input_ids, start_i=1, end_i=2)
        bias = g.op("Expand", bias, g.op("Concat", const([1, 1]), seq, const([1]), axis_i=0))
        return seqlens_k, total, bias


def attention_inputs(attention_mask: torch.Tensor, input_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention's per-step inputs from ``attention_mask`` [B, T] (every cache row kept, pads too):
    ``seqlens_k`` [B] int32 (``T - 1`` for every row), ``total_sequence_length`` [1] int32 and the additive padding
    bias [B, 1, S, T] in ``dtype``. Traces to a dozen ONNX nodes (the torch
    ops traced to about 45: shape arithmetic the tracer spells out one Unsqueeze at a time)."""
    return _AttentionInputs.apply(attention_mask, input_ids, dtype)


def _is_none(value: Any) -> bool:
    return hasattr(value, "node") and value.node().mustBeNone()


class _SimplifiedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    @staticmethod
    def symbolic(g: Any, x: Any, weight: Any, eps: float) -> Any:
        out = g.op("SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)
        out.setType(x.type())
        return out


def simplified_layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation over the last axis times ``weight``. Traces to ONNX Runtime's
    SimplifiedLayerNormalization (which ``fuse_skip_norms`` then joins with the residual Add before it)."""
    return _SimplifiedLayerNorm.apply(x, weight, float(eps))


def group_query_attention(query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
                          past_key: torch.Tensor, past_value: torch.Tensor, seqlens_k: torch.Tensor,
                          total: torch.Tensor, bias: torch.Tensor, num_heads: int, kv_heads: int,
                          scale: float, cos_cache: torch.Tensor | None = None,
                          sin_cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal grouped-query attention over ``past + new`` keys (``query`` [B, S, H*D], or packed QKV with
    ``key``/``value`` None; past [B, kv, P, D]; ``bias`` [B, 1, S, P+S] additive); returns the output
    [B, S, H*D] and the present key/value [B, kv, P+S, D]. With ``cos_cache``/``sin_cache`` [max_positions, D/2]
    the kernel rotates the new queries and keys itself (rotate-half) at positions ``P .. P+S-1`` of every row.
    Traces to GroupQueryAttention."""
    return _GroupQueryAttention.apply(query, key, value, past_key, past_value, seqlens_k, total, bias,
                                      int(num_heads), int(kv_heads), float(scale), cos_cache, sin_cache)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, heads, S, D] with ``cos``/``sin`` [S, D/2] (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# -------------------------------------------------------------------------------------------- adapters


@dataclass
class FusedState:
    """What the fused attention modules read and write during one traced forward (filled by the wrapper)."""

    past: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    present: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    seqlens_k: torch.Tensor | None = None
    total: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


Forward = Callable[..., Any]


def _llama_like(model: nn.Module, module: nn.Module, layer: int, heads: int, kv: int, head: int,
                state: FusedState) -> Forward | None:
    """q_proj / k_proj / v_proj / o_proj with rotary ``position_embeddings`` (Llama, Qwen2, Mistral, ...)."""
    if not all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return None
    config = getattr(model, "config", None)
    if (getattr(module, "sliding_window", None) or getattr(module, "q_norm", None) is not None
            or getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0)
            or getattr(config, "attn_logit_softcapping", None) or getattr(module, "is_causal", True) is False):
        return None
    scale = float(getattr(module, "scaling", head ** -0.5))

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        # the kernel's own rotary (GenAI's form: no RotaryEmbedding nodes). Its positions count every cache row,
        # pads too, so a left-padded row's positions are shifted by its pad count against Hugging Face's; rotary
        # attention depends only on position differences, so its outputs are the same (up to rounding)
        past_k, past_v = state.past[layer]
        out, pk, pv = group_query_attention(module.q_proj(hidden_states), module.k_proj(hidden_states),
                                            module.v_proj(hidden_states), past_k, past_v, state.seqlens_k,
                                            state.total, state.bias, heads, kv, scale, state.cos, state.sin)
        state.present[layer] = (pk, pv)
        return module.o_proj(out), None

    return forward


def _gpt2_like(model: nn.Module, module: nn.Module, layer: int, heads: int, kv: int, head: int,
               state: FusedState) -> Forward | None:
    """Packed ``c_attn`` (q | k | v) and ``c_proj``, learned positions (GPT-2)."""
    if not (hasattr(module, "c_attn") and hasattr(module, "c_proj")) or getattr(module, "is_cross_attention", False):
        return None
    if getattr(module, "reorder_and_upcast_attn", False) and getattr(module, "scale_attn_by_inverse_layer_idx", False):
        return None
    scale = float(getattr(module, "scaling", head ** -0.5))
    dropout = getattr(module, "resid_dropout", nn.Identity())

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        past_k, past_v = state.past[layer]
        out, pk, pv = group_query_attention(module.c_attn(hidden_states), None, None, past_k, past_v,
                                            state.seqlens_k, state.total, state.bias, heads, kv, scale)
        state.present[layer] = (pk, pv)
        return dropout(module.c_proj(out)), None

    return forward


ADAPTERS: tuple[Callable[..., Forward | None], ...] = (_llama_like, _gpt2_like)


def norm_adapters(model: nn.Module) -> dict[nn.Module, Forward]:
    """Fused forwards for the RMS norms of the Llama convention (``weight * x / rms(x)`` with a 1-D ``weight`` and
    ``variance_epsilon``: Llama, Qwen2, Mistral); other norms (Gemma's ``1 + weight``, LayerNorm) keep theirs."""
    out: dict[nn.Module, Forward] = {}
    for module in model.modules():
        weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
        if (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
                and isinstance(eps, float) and not list(module.children())):
            out[module] = (lambda m: lambda x, *a, **k: simplified_layer_norm(x, m.weight, m.variance_epsilon))(module)
    return out


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    from modelpress.graph.family import attention_modules

    return [m for _, m in attention_modules(model)]


def _rotary_caches(model: nn.Module, max_positions: int, head: int,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos/sin caches [max_positions, head/2] from the model's own rotary module (None: no rotary module)."""
    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    if rotary is None:
        return None
    param = next(model.parameters())
    pos = torch.arange(max_positions, device=param.device)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32, device=param.device), pos)
    cos, sin = cos[0].to(dtype), sin[0].to(dtype)  # RotaryEmbedding takes its input's type
    if cos.shape[-1] != head or not torch.equal(cos[:, : head // 2], cos[:, head // 2:]):
        return None  # not the rotate-half layout over the whole head
    return cos[:, : head // 2].contiguous(), sin[:, : head // 2].contiguous()


def attention_adapters(model: nn.Module, layout: Any, state: FusedState) -> dict[nn.Module, Forward] | None:
    """Fused forwards for every attention module of ``model`` (a cached-decoder ``DecoderLayout``), or None when
    one of them is not covered (then the plain-op export is used). Sets ``state.cos``/``state.sin``."""
    from modelpress.graph.family import attention_heads

    modules = _attention_modules(model)
    counts = attention_heads(model)
    if len(modules) != layout.num_layers or layout.max_positions is None:
        return None
    out: dict[nn.Module, Forward] = {}
    rotary = None
    for i, module in enumerate(modules):
        layer = int(getattr(module, "layer_idx", i))
        head, kv, heads = layout.head_sizes[layer], layout.kv_heads[layer], counts[i] or layout.num_heads
        if heads % kv:
            return None
        fwd = None
        for adapter in ADAPTERS:
            fwd = adapter(model, module, layer, heads, kv, head, state)
            if fwd is not None:
                break
        if fwd is None:
            return None
        if adapter is _llama_like:
            rotary = rotary or _rotary_caches(model, int(layout.max_positions), head, getattr(torch, layout.dtype))
            if rotary is None:
                return None
        out[module] = fwd
    if rotary is not None:
        state.cos, state.sin = rotary
    return out


@contextlib.contextmanager
def fused_attention(forwards: dict[nn.Module, Forward]) -> Iterator[None]:
    """Swap each module's forward for its fused one while tracing; restored afterwards."""
    try:
        for module, fwd in forwards.items():
            module.forward = fwd
        yield
    finally:
        for module in forwards:
            module.__dict__.pop("forward", None)


def fuse_skip_norms(model: Any) -> int:
    """``SimplifiedLayerNormalization(Add(a, b))`` -> ``SkipSimplifiedLayerNormalization(a, b)`` whose fourth
    output is the sum (the residual stream the Add fed to its other users), as ONNX Runtime GenAI's builder
    writes it; only where neither Add input is a constant (a residual join, not a bias). Returns the count."""
    from onnx import helper

    g = model.graph
    constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in g.node for o in n.output}
    drop: set[int] = set()
    replace: dict[int, Any] = {}
    for n in g.node:
        if n.op_type != "SimplifiedLayerNormalization" or n.domain not in ("", "ai.onnx"):
            continue
        add = producer.get(n.input[0])
        if add is None or add.op_type != "Add" or id(add) in drop or any(i in constants for i in add.input):
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        replace[id(n)] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], n.input[1]],
            [n.output[0], "", "", add.output[0]], name=(n.name or "norm") + "_skip", domain="com.microsoft",
            epsilon=eps)
        drop.add(id(add))
    if replace:
        # the fused node sits where the Add was (its inputs are ready there; the sum's users come after it)
        by_add = {id(producer[n.input[0]]): replace[id(n)] for n in g.node if id(n) in replace}
        nodes = [by_add.get(id(n), n) for n in g.node if id(n) not in replace]
        del g.node[:]
        g.node.extend(nodes)
    return len(replace)


def drop_empty_inputs(model: Any) -> int:
    """Clear the optional inputs of the fused ops that were traced as empty placeholder tensors (an absent input,
    ""), dropping placeholders left without users; returns how many inputs were cleared."""
    g = model.graph

    def size(t: Any) -> int:
        n = 1
        for d in t.dims:
            n *= d
        return n

    empties = {t.name for t in g.initializer if size(t) == 0}
    empties |= {n.output[0] for n in g.node if n.op_type == "Constant" and n.attribute
                and n.attribute[0].HasField("t") and size(n.attribute[0].t) == 0}
    count = 0
    for n in g.node:
        for i in OPTIONAL_INPUTS.get(n.op_type, ()) if n.domain == "com.microsoft" else ():
            if i < len(n.input) and n.input[i] in empties:
                n.input[i] = ""
                count += 1
    from modelpress.export.graph_edits import keep_nodes

    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep_nodes(g, lambda n: not (n.op_type == "Constant" and n.output[0] in empties and n.output[0] not in used))
    inits = [t for t in g.initializer if not (t.name in empties and t.name not in used)]
    del g.initializer[:]
    g.initializer.extend(inits)
    return count


def pack_attention_inputs(model: Any) -> int:
    """GroupQueryAttention(q, k, v) whose three inputs are, in order, the only uses of one Split's outputs (the
    packed q|k|v MatMulNBits of ``weight_only_export.pack_siblings``) reads the Split's input instead, in the
    kernel's packed-QKV form (key and value absent), as GenAI's builder writes it: one node fewer per layer, the
    same numbers (the packed layout is q | k | v, what the Split cut). Returns the number of nodes rewired."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 1
    drop: set[int] = set()
    for n in g.node:
        if n.op_type != "GroupQueryAttention" or n.domain != "com.microsoft" or len(n.input) < 3 or not n.input[1]:
            continue
        split = producer.get(n.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(n.input[:3]):
            continue
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        if axis not in (-1, 2) or any(uses.get(o, 0) != 1 for o in split.output):
            continue
        n.input[0], n.input[1], n.input[2] = split.input[0], "", ""
        drop.add(id(split))
    if drop:
        from modelpress.export.graph_edits import drop_unused_initializers, keep_nodes

        keep_nodes(g, lambda n: id(n) not in drop)
        drop_unused_initializers(g)
    return len(drop)
