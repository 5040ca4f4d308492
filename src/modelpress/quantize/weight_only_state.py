"""Save and reload packed weight-only models (a state codec, see ``models.saving.register_state_codec``).

The saved state holds the packed buffers themselves (uint8 codes, two 4-bit codes per byte, float scales,
packed zero points), so a W4 file is about an eighth of the FP32 weights; ``describe`` records each packed
module's shape and layout, and which modules share one packed tensor (a tied embedding and LM head, saved
once: ``models.saving`` stores tensors shared by data pointer once and aliases the rest).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelpress.quantize.weight_only_pack import WeightOnlyEmbedding, WeightOnlyLinear, _Packed

FORMAT = 1


def describe(model: nn.Module) -> dict[str, Any]:
    """JSON description of every packed module of ``model``."""
    layers: dict[str, Any] = {}
    owner: dict[int, str] = {}
    for name, m in model.named_modules():
        if not isinstance(m, _Packed):
            continue
        entry: dict[str, Any] = {"bits": m.bits, "block_size": m.block_size, "symmetric": m.symmetric,
                                 "shared_with": owner.get(id(m.qweight))}
        if isinstance(m, WeightOnlyLinear):
            entry.update(kind="linear", in_features=m.in_features, out_features=m.out_features,
                         bias=m.bias is not None, input_scale=m.input_scale is not None)
        else:
            entry.update(kind="embedding", num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim,
                         padding_idx=m.padding_idx)
        owner.setdefault(id(m.qweight), name)
        layers[name] = entry
    return {"format": FORMAT, "layers": layers}


def rebuild(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Put empty packed modules in place of the float ones described by ``spec`` (weights are loaded after)."""
    if spec.get("format") != FORMAT:
        raise ValueError(f"unknown weight-only spec format {spec.get('format')!r}")
    built: dict[str, _Packed] = {}
    for name, e in spec["layers"].items():
        if e["kind"] == "linear":
            m: _Packed = WeightOnlyLinear(e["in_features"], e["out_features"], e["bits"], e["block_size"],
                                          e["symmetric"], bias=e["bias"])
            if e["input_scale"]:
                m.input_scale = torch.ones(e["in_features"])
        else:
            m = WeightOnlyEmbedding(e["num_embeddings"], e["embedding_dim"], e["bits"], e["block_size"],
                                    e["symmetric"], e["padding_idx"])
        if e.get("shared_with"):
            m.share_from(built[e["shared_with"]])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m)
        built[name] = m
    return model
