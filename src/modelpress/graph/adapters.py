"""Adapters: keep a model's own description (its Hugging Face config) in step with the edited module.

``sync_config`` reads the graph's per-block widths (``stats``) and writes them into the config's keys
(``family``). The family facts themselves live in ``modelpress.graph.family``, the bottom of the package;
they are re-exported here under their historic names (``modelpress.graph.adapters.ort_model_type`` ...).
"""

from __future__ import annotations

from modelpress.graph.family import (
    FALLBACK_CLS_ID,
    FALLBACK_VOCAB_SIZE,
    HEAD_COUNT_ATTRS,
    HEAD_KEYS,
    HEAD_SIZE_ATTRS,
    HEAD_WIDTH_ATTRS,
    HIDDEN_KEYS,
    KEY_PROJ_NAMES,
    KV_HEAD_COUNT_ATTRS,
    KV_HEAD_KEYS,
    LAYER_INDEX_ATTRS,
    LAYER_KEYS,
    MLP_KEYS,
    QUERY_PROJ_NAMES,
    TextDefaults,
    attention_heads,
    attention_modules,
    attribute_edits,
    head_attribute_edits,
    head_dim_attribute_edits,
    head_sizes,
    hf_config,
    hidden_size,
    input_defaults,
    is_transposed_linear,
    kv_heads,
    layer_index_edits,
    max_sequence_length,
    ort_model_type,
    start_token_id,
)
from modelpress.graph.stats import GraphView, block_widths, embedding_width

__all__ = [
    "FALLBACK_CLS_ID", "FALLBACK_VOCAB_SIZE", "HEAD_COUNT_ATTRS", "HEAD_KEYS", "HEAD_SIZE_ATTRS", "HEAD_WIDTH_ATTRS",
    "HIDDEN_KEYS", "KEY_PROJ_NAMES", "KV_HEAD_COUNT_ATTRS", "KV_HEAD_KEYS", "LAYER_INDEX_ATTRS", "LAYER_KEYS",
    "MLP_KEYS", "QUERY_PROJ_NAMES", "TextDefaults", "attention_heads", "attention_modules", "attribute_edits",
    "head_attribute_edits", "head_dim_attribute_edits", "head_sizes", "hf_config", "hidden_size", "input_defaults",
    "is_transposed_linear", "kv_heads", "layer_index_edits", "max_sequence_length", "ort_model_type",
    "start_token_id", "sync_config",
]


def _set_first(config: object, keys: tuple[str, ...], value: object) -> None:
    for k in keys:
        if hasattr(config, k) and not isinstance(getattr(config, k), (list, tuple, dict)):
            setattr(config, k, value)
            return


def sync_config(graph: GraphView) -> None:
    """Keep a Hugging Face config consistent with the edited module.

    Uniform widths go into the usual keys; non-uniform per-layer widths go into
    ``config.modelpress_widths`` (and the usual key keeps the largest value).
    """
    config = getattr(graph.module, "config", None)
    if config is None:
        return
    rows = block_widths(graph)
    per_layer: dict[str, list[int]] = {}
    heads = [r["heads"] for r in rows if "heads" in r]
    kv_heads = [r.get("kv_heads", r["heads"]) for r in rows if "heads" in r]
    mlp = [r["mlp"] for r in rows if "mlp" in r]
    if heads:
        per_layer["num_attention_heads"] = heads
        _set_first(config, HEAD_KEYS, max(heads))
        kv_key = next((k for k in KV_HEAD_KEYS if isinstance(getattr(config, k, None), int)), None)
        if kv_key is not None:
            per_layer["num_key_value_heads"] = kv_heads
            setattr(config, kv_key, max(kv_heads))
    if mlp:
        per_layer["intermediate_size"] = mlp
        _set_first(config, MLP_KEYS, max(mlp))
    width = embedding_width(graph)
    if width:
        _set_first(config, HIDDEN_KEYS, width)
    if rows:
        _set_first(config, LAYER_KEYS, len(rows))
    uniform = all(len(set(v)) <= 1 for v in per_layer.values())
    if uniform:
        if hasattr(config, "modelpress_widths"):
            delattr(config, "modelpress_widths")
    else:
        config.modelpress_widths = per_layer
