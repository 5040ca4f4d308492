"""Adapter for Hugging Face transformers (5.x) attention: quantize QK^T and probs @ V.

transformers 5 attention modules (BertSelfAttention, ViTSelfAttention, ...) compute their projections and
then call an attention function looked up by name in ``ALL_ATTENTION_FUNCTIONS`` from
``config._attn_implementation``. We register one more function, ``"modelpress_quant"``, that is eager
attention with the two matmuls routed through the ``attn_qk`` / ``attn_pv`` QuantMatMul modules stored on
the attention module (plain matmuls where a module has none), plus the eager additive mask for it.
Everything HF-specific about quantization lives in this module.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

IMPL = "modelpress_quant"
_REGISTERED = False


def register() -> None:
    """Register the quantized attention function and its mask builder with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(IMPL, quant_attention_forward)
    AttentionMaskInterface.register(IMPL, eager_mask)
    _REGISTERED = True


def quant_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention ([batch, heads, seq, head_dim] inputs) with quantizable matmuls."""
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    qk = getattr(module, "attn_qk", None)
    pv = getattr(module, "attn_pv", None)
    key_t = key.transpose(2, 3)
    scores = qk(query, key_t) if qk is not None else torch.matmul(query, key_t)
    scores = scores * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(
                ~attention_mask, torch.finfo(scores.dtype).min
            )
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = pv(probs, value) if pv is not None else torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs


def _calls_attention_interface(cls: type) -> bool:
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface" in src


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose forward dispatches through transformers' attention interface."""
    cache: dict[type, bool] = {}
    found = []
    for name, m in model.named_modules():
        cls = type(m)
        if cls not in cache:
            cache[cls] = cls.__module__.startswith("transformers.") and _calls_attention_interface(cls)
        if cache[cls]:
            found.append((name, m))
    return found


def _configs(model: nn.Module) -> list:
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def enable(model: nn.Module) -> str | None:
    """Route the model's attention through the quantized function; returns the previous implementation."""
    register()
    configs = _configs(model)
    if not configs:
        return None
    previous = configs[0]._attn_implementation
    for cfg in configs:
        cfg._attn_implementation = IMPL
    return previous


def disable(model: nn.Module, implementation: str = "eager") -> None:
    for cfg in _configs(model):
        cfg._attn_implementation = implementation


def is_enabled(model: nn.Module) -> bool:
    return any(cfg._attn_implementation == IMPL for cfg in _configs(model))
