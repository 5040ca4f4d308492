"""Quantization: quantizers (uniform, log2, log-sqrt2), observers and calibration, fake-quant wrappers,
scale reparameterization (RepQ-ViT / RepQuant), dual clipping, weight reconstruction (GPTQ, AdaRound),
mixed-precision policies and the quantization passes.

Typical use (the ``quantize.repq`` pass does this on a ModelGraph)::

    from modelpress.quantize import RepQConfig, quantize_model
    result = quantize_model(model, calibration_batches, graph.norm_consumers(), RepQConfig())
    # then modelpress.quantize.qdq.export_qdq(model, example_inputs, "model.int8.onnx")
"""

from __future__ import annotations

from modelpress.quantize.fakequant import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    calibrate,
    calibrate_weights,
    is_fake_quant,
    set_quant_state,
    wrap_model,
)
from modelpress.quantize.policy import LayerSpec, Policy, parse_spec
from modelpress.quantize.quantizers import Log2Quantizer, LogSqrt2Quantizer, UniformQuantizer
from modelpress.quantize.repq import RepQConfig, RepQResult, quantize_model
from modelpress.quantize.state import describe, rebuild

__all__ = [
    "LayerSpec",
    "Log2Quantizer",
    "LogSqrt2Quantizer",
    "Policy",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "RepQConfig",
    "RepQResult",
    "UniformQuantizer",
    "calibrate",
    "calibrate_weights",
    "describe",
    "is_fake_quant",
    "parse_spec",
    "quantize_model",
    "rebuild",
    "set_quant_state",
    "wrap_model",
]
