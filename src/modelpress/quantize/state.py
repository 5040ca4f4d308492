"""Describe a fake-quant model's structure as JSON and rebuild it on a fresh float model.

A quantized model saves as its state dict (weights plus every quantizer's scales and zero points) and
``describe(model)``; reloading builds the float architecture, calls ``rebuild(model, spec)`` to put the
same wrappers, shared quantizers and reparameterization buffers in place, then loads the state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelpress.quantize import hf_attention
from modelpress.quantize.fakequant import QuantConv2d, QuantLinear, QuantMatMul, _set_submodule, quant_layers
from modelpress.quantize.log2 import Log2ShiftMatMul
from modelpress.quantize.quantizers import Log2Quantizer, LogSqrt2Quantizer, UniformQuantizer

FORMAT = 1


def _q(q: nn.Module | None) -> dict[str, Any] | None:
    if q is None:
        return None
    if isinstance(q, UniformQuantizer):
        return {
            "kind": "uniform",
            "bits": q.bits,
            "symmetric": q.symmetric,
            "axis": q.axis,
            "narrow": q.narrow,
        }
    return {"kind": "logsqrt2" if isinstance(q, LogSqrt2Quantizer) else "log2", "bits": q.bits}


def _make(d: dict[str, Any] | None) -> nn.Module | None:
    if d is None:
        return None
    if d["kind"] == "uniform":
        return UniformQuantizer(d["bits"], d["symmetric"], d["axis"], d["narrow"])
    return (LogSqrt2Quantizer if d["kind"] == "logsqrt2" else Log2Quantizer)(d["bits"])


def describe(model: nn.Module) -> dict[str, Any]:
    """JSON-serializable structure of the fake-quant layers of ``model``."""
    layers: dict[str, Any] = {}
    owner: dict[int, str] = {}
    for name, m in quant_layers(model):
        if isinstance(m, QuantMatMul):
            layers[name] = {
                "type": "log2shift" if isinstance(m, Log2ShiftMatMul) else "matmul",
                "a": _q(m.a_quantizer),
                "b": _q(m.b_quantizer),
            }
            continue
        iq = m.input_quantizer
        entry: dict[str, Any] = {
            "type": "linear" if isinstance(m, QuantLinear) else "conv2d",
            "weight": _q(m.weight_quantizer),
            "input": _q(iq),
            "input_shared_with": owner.get(id(iq)) if iq is not None else None,
            "input_transform": isinstance(m, QuantLinear) and m.input_scale is not None,
            "channel_params": isinstance(iq, UniformQuantizer) and iq.channel_scale is not None,
            "bias": m.bias is not None,
            "own_weight": bool(getattr(m, "own_weight", False)),
        }
        if iq is not None and id(iq) not in owner:
            owner[id(iq)] = name
        layers[name] = entry
    return {"format": FORMAT, "layers": layers, "hf_attention": hf_attention.is_enabled(model)}


def rebuild(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Wrap the float ``model`` in place as described by ``spec`` (then load the saved state dict)."""
    if spec.get("format") != FORMAT:
        raise ValueError(f"unknown quantization spec format {spec.get('format')!r}")
    built: dict[str, nn.Module] = {}
    for name, e in spec["layers"].items():
        if e["type"] in ("matmul", "log2shift"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            cls = Log2ShiftMatMul if e["type"] == "log2shift" else QuantMatMul
            setattr(parent, child, cls(_make(e["a"]), _make(e["b"])))
            continue
        base = model.get_submodule(name)
        cls = QuantLinear if e["type"] == "linear" else QuantConv2d
        m = cls(base, None, None, own_weight=True) if e.get("own_weight") else cls(base, None, None)
        m.weight_quantizer = _make(e["weight"])
        if e["input_shared_with"] is not None:
            m.input_quantizer = built[e["input_shared_with"]].input_quantizer
        else:
            m.input_quantizer = _make(e["input"])
        iq = m.input_quantizer
        if e.get("channel_params") and iq.channel_scale is None:
            iq.channel_scale = torch.zeros(1)
            iq.channel_zero = torch.zeros(1)
        if e["input_transform"]:
            m.input_scale = torch.ones(m.in_features)
            m.input_shift = torch.zeros(m.in_features)
        if isinstance(m, QuantLinear) and m.bias is None and e.get("bias"):
            m.bias = nn.Parameter(torch.zeros(m.out_features))  # created by scale reparameterization
        _set_submodule(model, name, m)
        built[name] = m
    if spec.get("hf_attention"):
        hf_attention.enable(model)
    return model
