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


# ------------------------------------------------------- fake-quant (W4A8 / W8A8) weights as packed codes
CODES_SUFFIX = ".codes"


def _fake_quant_weights(model: nn.Module) -> list[tuple[str, str, Any]]:
    """(layer, weight key, weight quantizer) of fake-quant layers whose weights are symmetric integer codes."""
    from modelpress.quantize.fakequant import QuantConv2d, QuantLinear
    from modelpress.quantize.quantizers import UniformQuantizer

    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (QuantLinear, QuantConv2d)):
            continue
        q = m.weight_quantizer
        if not (isinstance(q, UniformQuantizer) and q.calibrated and q.enabled and q.symmetric and q.bits <= 8):
            continue
        if bool((q.zero_point != 0).any()):
            continue
        out.append((name, f"{name}.weight" if isinstance(m, QuantLinear) else f"{name}.conv.weight", q))
    return out


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, cols] -> two per byte (low first) for bits <= 4, else unchanged."""
    if bits > 4:
        return codes.contiguous()
    if codes.shape[1] % 2:
        codes = torch.cat([codes, torch.zeros(codes.shape[0], 1, dtype=torch.uint8)], dim=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def _unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    if bits > 4:
        return packed
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :cols]


def encode_fake_quant(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write each fake-quant layer's weight as its integer codes (``<weight>.codes``, uint8 offset by
    2^(bits-1); two per byte at 4 bits or fewer) instead of float: the forward quantizes the weight onto the
    same codes, so the reloaded model computes the same outputs."""
    state = dict(state)
    for _, key, q in _fake_quant_weights(model):
        if key not in state:
            continue
        w = state[key].float()
        rows = w.reshape(w.shape[0], -1)
        scale = q.scale.detach().float().reshape(-1, 1) if q.scale.dim() else q.scale.detach().float()
        codes = torch.clamp(torch.round(rows / scale), q.qmin, q.qmax) + 2 ** (q.bits - 1)
        state[key + CODES_SUFFIX] = _pack_rows(codes.to(torch.uint8), q.bits)
        del state[key]
    return state


def decode_fake_quant(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float weights back from ``encode_fake_quant``'s codes and the saved weight scales."""
    weights = dict(weights)
    for name, key, q in _fake_quant_weights_rebuilt(model):
        packed = weights.pop(key + CODES_SUFFIX, None)
        if packed is None:
            continue
        shape = model.get_submodule(name).weight.shape
        cols = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
        scale = weights[f"{name}.weight_quantizer.scale"].float()
        scale = scale.reshape(-1, 1) if scale.dim() else scale
        codes = _unpack_rows(packed, q.bits, cols).to(torch.int32) - 2 ** (q.bits - 1)
        weights[key] = (codes.float() * scale).reshape(shape)
    return weights


def _fake_quant_weights_rebuilt(model: nn.Module) -> list[tuple[str, str, Any]]:
    """Like ``_fake_quant_weights`` on a freshly rebuilt model (quantizers not calibrated before loading)."""
    from modelpress.quantize.fakequant import QuantConv2d, QuantLinear
    from modelpress.quantize.quantizers import UniformQuantizer

    return [(name, f"{name}.weight" if isinstance(m, QuantLinear) else f"{name}.conv.weight", m.weight_quantizer)
            for name, m in model.named_modules()
            if isinstance(m, (QuantLinear, QuantConv2d)) and isinstance(m.weight_quantizer, UniformQuantizer)]
