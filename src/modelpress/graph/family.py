"""Model-family facts that tracing cannot see, in one place: the bottom of ``modelpress.graph``.

It imports nothing of the package, so every other module of it may read these facts. Config keys for
widths, head counts and layer counts (kept in sync with edits by ``adapters.sync_config``);
the module attributes that hold head counts and widths (``head_attribute_edits`` updates them when
heads go); head counts and head sizes read from the attention modules themselves (correct after non-uniform
head pruning, where the config can only hold the largest count); the ONNX Runtime transformer-optimizer
type of each family that has been checked to fuse correctly; and sample-input defaults (vocabulary
size, special token ids) taken from the model's tokenizer or config instead of BERT's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

HEAD_KEYS = ("num_attention_heads", "num_heads", "n_head", "encoder_attention_heads")
# grouped-query attention: key/value heads (each read by num_attention_heads / num_key_value_heads queries)
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
MLP_KEYS = ("intermediate_size", "n_inner", "mlp_dim", "hidden_dim", "encoder_ffn_dim")
HIDDEN_KEYS = ("hidden_size", "n_embd", "dim", "d_model", "embed_dim")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers")


# ------------------------------------------------------------------------------ ONNX Runtime types

# Hugging Face model_type -> onnxruntime.transformers.optimizer model_type, only for families whose
# export (transformers 5.24, eager attention, no cache; ORT 1.32) was checked to match torch after the
# optimizer, on tiny models with peaked attention: the bert-likes fuse Attention, SkipLayerNormalization
# and BiasGelu; vit/deit and gpt2 fuse the LayerNorms and Gelus (their attention stays unfused).
# tests/export/test_export_heads.py keeps bert, distilbert, vit and gpt2 checked. Any other family
# gets None: the transformer optimizer is not tried (mpnet, swin, t5, ... were never checked).
_ORT_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "electra": "bert",
    "albert": "bert",
    "distilbert": "bert",
    "vit": "vit",
    "deit": "vit",
    "gpt2": "gpt2",
}


def hf_config(module: nn.Module) -> Any:
    """The config of the first Hugging Face model inside ``module`` (itself included), or None."""
    for m in module.modules():
        config = getattr(m, "config", None)
        if isinstance(getattr(config, "model_type", None), str):
            return config
    return None


def ort_model_type(module: nn.Module) -> str | None:
    """The ONNX Runtime transformer-optimizer model type for ``module``'s family (None when unsure)."""
    config = hf_config(module)
    return _ORT_MODEL_TYPES.get(config.model_type) if config is not None else None


# ------------------------------------------------------------------------------ attention facts

# attributes that hold a head count, a key/value head count, the total attention width or one head's
# width, as named across model families
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_head", "n_heads", "num_attention_heads_per_partition")
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "num_key_value_heads_per_partition")
HEAD_WIDTH_ATTRS = (
    "all_head_size", "inner_dim", "split_size", "hidden_size_per_partition", "attention_dim", "attn_dim", "val_attn_dim",
)
HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "head_size", "key_value_proj_dim")
# projections of an attention module that keeps only its head size (Llama): heads = width / head size
QUERY_PROJ_NAMES = ("q_proj", "query", "q_lin", "q")
KEY_PROJ_NAMES = ("k_proj", "key", "k_lin", "k")


def _int_attr(mod: nn.Module, names: tuple[str, ...]) -> int | None:
    for attr in names:
        value = getattr(mod, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _heads_from_proj(mod: nn.Module, proj_names: tuple[str, ...]) -> int | None:
    size = _int_attr(mod, HEAD_SIZE_ATTRS)
    for name in proj_names:
        # any projection with a width: nn.Linear, or a packed one (weight-only quantized) carrying out_features
        width = getattr(getattr(mod, name, None), "out_features", None)
        if size and isinstance(width, int) and width % size == 0:
            return width // size
    return None


def _head_count(mod: nn.Module) -> int | None:
    return _int_attr(mod, HEAD_COUNT_ATTRS) or _heads_from_proj(mod, QUERY_PROJ_NAMES)


def _kv_head_count(mod: nn.Module) -> int | None:
    return _int_attr(mod, KV_HEAD_COUNT_ATTRS) or _heads_from_proj(mod, KEY_PROJ_NAMES) or _head_count(mod)


def attention_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules of ``module`` in model order: the innermost modules holding a head count.

    A module shared by several layers (ALBERT) appears once.
    """
    found = [(name, m) for name, m in module.named_modules() if _head_count(m) is not None]
    return [(name, m) for name, m in found if not any(_inside(other, name) for other, _ in found)]


def _inside(child: str, parent: str) -> bool:
    return child != parent and (parent == "" or child.startswith(f"{parent}."))


def attention_heads(module: nn.Module) -> list[int]:
    """Heads per attention module, in model order, as the modules hold them after edits."""
    return [int(_head_count(m) or 0) for _, m in attention_modules(module)]


def kv_heads(module: nn.Module) -> list[int]:
    """Key/value heads per attention module, in model order (equal to the heads without grouped-query attention)."""
    return [int(_kv_head_count(m) or 0) for _, m in attention_modules(module)]


def head_attribute_edits(
    root: nn.Module, scope: str, query: tuple[int, int], kv: tuple[int, int], head_dim: int
) -> list[dict]:
    """``setattr`` records that keep attention attributes right when heads go (tracing cannot see them).

    ``query`` and ``kv`` are the (old, new) counts of query and key/value heads of the attention at
    ``scope`` (equal under multi-head attention). Walks up from ``scope`` (at most two levels) to the
    first module subtree holding a head-count or head-width attribute of the old value. Attributes that
    depend on neither (``head_dim``, Llama's ``num_key_value_groups``: removing whole key/value groups
    keeps the queries per key/value head) stay.
    """
    wanted = [
        (HEAD_COUNT_ATTRS, query[0], query[1]),
        (KV_HEAD_COUNT_ATTRS, kv[0], kv[1]),
        (HEAD_WIDTH_ATTRS, query[0] * head_dim, query[1] * head_dim),
    ]
    return attribute_edits(root, scope, wanted)


def attribute_edits(
    root: nn.Module, scope: str, wanted: list[tuple[tuple[str, ...], int, int]]
) -> list[dict]:
    """``setattr`` records turning every int attribute named in ``wanted`` (names, old, new) that holds
    ``old`` into ``new``, in the subtree at ``scope``, else one or two levels up (the first that has any)."""
    parts = scope.split(".") if scope else []
    edits: list[dict] = []
    for depth in range(len(parts), -1, -1):
        path = ".".join(parts[:depth])
        base = root.get_submodule(path) if path else root
        for sub_path, mod in base.named_modules():
            full = f"{path}.{sub_path}".strip(".") if sub_path else path
            for names, old, new in wanted:
                for attr in names:
                    value = getattr(mod, attr, None)
                    if isinstance(value, int) and not isinstance(value, bool) and value == old:
                        edits.append({"op": "setattr", "module": full, "attr": attr, "value": new})
        if edits or depth <= max(0, len(parts) - 2):
            return edits
    return edits


def head_dim_attribute_edits(root: nn.Module, scope: str, heads: int, old: int, new: int) -> list[dict]:
    """``setattr`` records for a head-width cut at ``scope``: head-size attributes ``old`` -> ``new`` and
    total attention widths ``heads * old`` -> ``heads * new`` (the scale is kept; see ``head_dims``)."""
    wanted = [(HEAD_SIZE_ATTRS, old, new), (HEAD_WIDTH_ATTRS, heads * old, heads * new)]
    return attribute_edits(root, scope, wanted)


# attributes holding a block's position in its stack (decoders index their key/value cache by it)
LAYER_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_index")


def layer_index_edits(root: nn.Module, container: str, deleted: int) -> list[dict]:
    """``setattr`` records renumbering the layer indices of the blocks after a deleted one.

    Item ``deleted`` of ``container`` is already gone: the item now at position k (k >= deleted) was
    item k + 1, and its modules that held k + 1 as their layer index get k, so a key/value cache sized
    by the remaining layers is indexed right.
    """
    items = root.get_submodule(container) if container else root
    edits: list[dict] = []
    for k, item in enumerate(items):
        if k < deleted:
            continue
        for sub_path, mod in item.named_modules():
            for attr in LAYER_INDEX_ATTRS:
                value = getattr(mod, attr, None)
                if isinstance(value, int) and not isinstance(value, bool) and value == k + 1:
                    path = ".".join(p for p in (container, str(k), sub_path) if p)
                    edits.append({"op": "setattr", "module": path, "attr": attr, "value": k})
    return edits


def head_sizes(module: nn.Module) -> list[int]:
    """Width of one head per attention module (0 where the module does not say)."""
    sizes = []
    for _, m in attention_modules(module):
        heads = int(_head_count(m) or 0)
        size = next((getattr(m, a) for a in HEAD_SIZE_ATTRS if isinstance(getattr(m, a, None), int)), None)
        if size is None:
            width = next((getattr(m, a) for a in HEAD_WIDTH_ATTRS if isinstance(getattr(m, a, None), int)), 0)
            size = width // heads if heads and width % heads == 0 else 0
        sizes.append(int(size))
    return sizes


def is_transposed_linear(mod: nn.Module) -> bool:
    """Whether ``mod`` is a linear layer storing its weight as [in, out] (transformers' ``Conv1D``, used by
    GPT-2 and its relatives): ``x @ weight + bias``, an ``nn.Linear`` with the weight transposed."""
    w = getattr(mod, "weight", None)
    return type(mod).__name__ == "Conv1D" and isinstance(w, nn.Parameter) and w.dim() == 2


def _input_width(mod: nn.Module) -> int | None:
    for sub in mod.modules():
        if isinstance(sub, nn.Linear):
            return int(sub.in_features)
        if is_transposed_linear(sub):  # GPT-2's [in, out] linear
            return int(sub.weight.shape[0])
    return None


def hidden_size(module: nn.Module) -> int | None:
    """Width of the residual stream: what the first attention module reads (else the config's key)."""
    for _, m in attention_modules(module)[:1]:
        width = _input_width(m)
        if width:
            return width
    config = hf_config(module)
    for key in HIDDEN_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


# ------------------------------------------------------------------------------ input defaults

# Used only when neither a tokenizer nor a config says otherwise (BERT uncased: the historic default,
# which keeps sample inputs of hand-made InputSpecs unchanged).
# families whose position ids start after the padding index (RoBERTa's create_position_ids_from_input_ids)
_PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "ibert",
                             "xlm-roberta-xl", "roberta-prelayernorm", "luke", "markuplm", "esm"}


def max_sequence_length(module: nn.Module) -> int | None:
    """The longest input the model's position table takes (None: unknown or unbounded): the config's
    ``max_position_embeddings``, less the padding offset where position ids start after the pad id."""
    config = hf_config(module)
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return None
    if getattr(config, "model_type", None) in _PADDING_OFFSET_POSITIONS:
        pad = getattr(config, "pad_token_id", None)
        positions -= (pad if isinstance(pad, int) and pad >= 0 else 0) + 1
    return max(1, positions)


FALLBACK_VOCAB_SIZE = 30522
FALLBACK_CLS_ID = 101
_SPECIAL = ("cls", "bos", "sep", "eos", "pad")


@dataclass
class TextDefaults:
    """Vocabulary size and special token ids (only those inside the vocabulary) for sample text inputs."""

    vocab_size: int
    special_ids: dict[str, int] = field(default_factory=dict)


def input_defaults(module: nn.Module | None = None, tokenizer: Any = None) -> TextDefaults:
    """Sample-input facts for a text model, from its tokenizer, else its config, else BERT's.

    The vocabulary is the smaller of the embedding's rows (config) and the tokenizer's size, so every
    sampled id is valid for both; special ids outside it (a config's default ``bos_token_id`` of a
    shrunken vocabulary) are dropped.
    """
    config = hf_config(module) if module is not None else None
    sizes = [v for v in (getattr(config, "vocab_size", None), _tokenizer_size(tokenizer)) if isinstance(v, int) and v > 0]
    vocab = min(sizes) if sizes else FALLBACK_VOCAB_SIZE
    ids: dict[str, int] = {}
    for name in _SPECIAL:
        for source in (tokenizer, config):
            value = getattr(source, f"{name}_token_id", None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab:
                ids[name] = value
                break
    if module is None and tokenizer is None:
        ids = {"cls": FALLBACK_CLS_ID}
    return TextDefaults(vocab, ids)


def _tokenizer_size(tokenizer: Any) -> int | None:
    if tokenizer is None:
        return None
    try:
        return int(len(tokenizer))
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
        return size if isinstance(size, int) else None


def start_token_id(special_ids: dict[str, int], vocab_size: int) -> int:
    """The id a sample sequence starts with: the model's cls (else bos) token.

    Without either (hand-made specs), BERT's [CLS] where the vocabulary is BERT-sized, else 0, as
    modelpress always did, so existing sample inputs do not change.
    """
    for name in ("cls", "bos"):
        if name in special_ids and 0 <= special_ids[name] < vocab_size:
            return special_ids[name]
    return FALLBACK_CLS_ID if vocab_size > 1000 else 0


_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def norm_remainder(norm: nn.Module) -> nn.Module | None:
    """What is left of a BatchNorm module once its normalization is folded into the layer before it: an
    identity for torch's own; for timm's norm+activation modules (BatchNormAct2d: normalize, then its
    ``drop`` and ``act``) those two; None for any other subclass (not folded: its forward is unknown)."""
    if type(norm) in _PLAIN_BATCH_NORMS:
        return nn.Identity()
    if (isinstance(norm, nn.modules.batchnorm._BatchNorm) and type(norm).__name__.startswith("BatchNormAct")
            and isinstance(getattr(norm, "act", None), nn.Module) and isinstance(getattr(norm, "drop", None), nn.Module)):
        return nn.Sequential(norm.drop, norm.act)
    return None
