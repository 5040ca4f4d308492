"""Model-family facts that tracing cannot see: config keys for widths, head counts, layer counts."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelpress.graph.model_graph import ModelGraph

HEAD_KEYS = ("num_attention_heads", "num_heads", "n_head", "encoder_attention_heads")
MLP_KEYS = ("intermediate_size", "n_inner", "mlp_dim", "hidden_dim", "encoder_ffn_dim")
HIDDEN_KEYS = ("hidden_size", "n_embd", "dim", "d_model", "embed_dim")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers")


def _set_first(config: object, keys: tuple[str, ...], value: object) -> None:
    for k in keys:
        if hasattr(config, k) and not isinstance(getattr(config, k), (list, tuple, dict)):
            setattr(config, k, value)
            return


def sync_config(graph: ModelGraph) -> None:
    """Keep a Hugging Face config consistent with the edited module.

    Uniform widths go into the usual keys; non-uniform per-layer widths go into
    ``config.modelpress_widths`` (and the usual key keeps the largest value).
    """
    config = getattr(graph.module, "config", None)
    if config is None:
        return
    from modelpress.graph.stats import block_widths, embedding_width

    rows = block_widths(graph)
    per_layer: dict[str, list[int]] = {}
    heads = [r["heads"] for r in rows if "heads" in r]
    mlp = [r["mlp"] for r in rows if "mlp" in r]
    if heads:
        per_layer["num_attention_heads"] = heads
        _set_first(config, HEAD_KEYS, max(heads))
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
