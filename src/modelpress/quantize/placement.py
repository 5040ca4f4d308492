"""QDQ placement for convolutional networks: the quantize/dequantize pairs go where ONNX Runtime's QDQ
transformer fuses them into integer kernels (QLinearConv, QLinearAdd, QLinearMul, QLinearGlobalAveragePool,
QLinearSigmoid, uint8 MaxPool, with ReLU/Clip absorbed into the output's range).

A convolutional network needs every tensor between two integer kernels quantized, not just each layer's
input: a residual Add that reads a float conv output and a float identity keeps the convolution around it
float (the cause of the 0.5x "INT8" CNNs this replaces). Rather than re-deriving ONNX Runtime's placement
rules, this uses its own QDQ quantizer (``quantize_static``) for the placement, on a float export of the
fake-quant model whose weights already hold their quantized values, and overrides the scales it would
choose with the ones modelpress calibrated and reconstructed:

* every quantized layer's weight: its int8 codes and per-output-channel scales exactly as in the torch
  model (on the BatchNorm-folded weights; GPTQ-reconstructed for Linear layers, min-max for convolutions,
  7-bit on CPUs without VNNI), through ORT's per-channel ``TensorQuantOverrides``;
* every quantized layer's input: the scale and zero point its input quantizer calibrated;
* the remaining tensors (conv outputs feeding an Add, the Add outputs, pooling): ORT's calibrator on the
  same calibration samples.

Models this does not fit (quantized attention matmuls, consumer-side scale reparameterization, log2
probability quantizers: the transformer export in ``qdq.py`` handles those) are refused by
``placement_applies`` with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from modelpress.graph.run import PrimaryOutput, eval_mode
from modelpress.quantize.fakequant import QuantConv2d, QuantLinear, QuantMatMul, _set_submodule, quant_layers

__all__ = ["export_float", "export_placed", "onnx_feeds", "placement_applies"]

# ONNX ops whose QDQ form ONNX Runtime's CPU provider fuses into integer kernels (or runs on uint8
# directly); everything else (Erf, HardSigmoid, Softmax ...) stays float between a DQ and a Q
FUSED_OPS = ("Conv", "Gemm", "MatMul", "Add", "Mul", "MaxPool", "AveragePool", "GlobalAveragePool", "Sigmoid",
             "Concat", "Relu", "Clip", "Resize", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
             "LeakyRelu", "Split")


def placement_applies(model: nn.Module) -> tuple[bool, str]:
    """Whether the conv placement fits this fake-quant model, and if not, why (see the module doc)."""
    layers = list(quant_layers(model))
    convs = [m for _, m in layers if isinstance(m, QuantConv2d) and _quantized(m)]
    if len(convs) < 2:
        return False, "fewer than two quantized convolutions (a transformer's patch embedding, say)"
    if any(isinstance(m, QuantMatMul) for _, m in layers):
        return False, "quantized attention matmuls"
    for name, m in layers:
        if isinstance(m, QuantLinear) and m.input_scale is not None:
            return False, f"{name} reads a reparameterized input"
        q = getattr(m, "input_quantizer", None)
        if q is not None and (getattr(q, "channel_scale", None) is not None or q.axis is not None):
            return False, f"{name} has a per-channel input quantizer"
        if q is not None and not hasattr(q, "zero_point"):
            return False, f"{name} has a non-uniform input quantizer"
    return True, ""


def onnx_feeds(batches: Sequence[Any], names: Sequence[str], samples: int) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` samples of torch batches as ONNX Runtime feeds (one dict per batch)."""
    out, n = [], 0
    for b in batches:
        items = b if isinstance(b, dict) else {names[0]: b}
        size = int(next(iter(items.values())).shape[0])
        take = min(size, samples - n)
        if take <= 0:
            break
        out.append({k: v[:take].detach().cpu().numpy() for k, v in items.items() if k in names})
        n += take
    return out


def _quantized(m: nn.Module) -> bool:
    wq = getattr(m, "weight_quantizer", None)
    return wq is not None and wq.enabled and wq.calibrated


def float_twin(model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A float copy of the fake-quant ``model`` whose quantized layers hold their quantized weights, and
    {parameter name of each such weight: its quantized layer in ``model``}."""
    twin = copy.deepcopy(model)
    layers = dict(quant_layers(model))
    weights: dict[str, nn.Module] = {}
    with torch.no_grad():
        for name, m in list(quant_layers(twin)):
            if isinstance(m, QuantConv2d):
                plain: nn.Module = m.conv
                value = m.quantized_weight().detach().clone()
            elif isinstance(m, QuantLinear):
                plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                if m.bias is not None:
                    plain.bias = nn.Parameter(m.bias.detach().clone())
                value = m.quantized_weight().detach().clone()
            else:  # not reached: placement_applies refuses quantized matmuls
                continue
            plain.weight = nn.Parameter(value)
            _set_submodule(twin, name, plain)
            if _quantized(layers[name]):
                weights[f"{name}.weight"] = layers[name]
    return twin, weights


def export_float(model: nn.Module, example: Any, path: Path, names: Sequence[str],
                  dynamic_axes: dict[str, dict[int, str]], opset: int = 17, *, stream: bool = False) -> None:
    """Export ``model`` (float, or fake-quant with its quantizers off) to plain ONNX at ``path``. ``stream``: a
    model of at least ``STREAM_MIN_BYTES`` of weights writes them from the live tensors to ``<path>.data``
    (torch's exporter otherwise holds about three more copies: +2.8x BERT-base's weights, measured)."""
    from modelpress.export.streamed import STREAM_MIN_BYTES, export_streamed, weight_bytes

    args = tuple(example[n] for n in names) if isinstance(example, dict) else (example,)
    kwargs = {"output_names": ["output"], "dynamic_axes": {**dynamic_axes, "output": {0: "batch"}},
              "opset_version": opset, "do_constant_folding": True, "dynamo": False}
    with eval_mode(model), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if stream and weight_bytes(model) >= STREAM_MIN_BYTES:
            export_streamed(PrimaryOutput(model, list(names)), args, path, input_names=list(names),
                            graph_shape_inference=False, **kwargs)
        else:
            torch.onnx.export(PrimaryOutput(model, list(names)), args, str(path), input_names=list(names), **kwargs)


def _overrides(path: Path, weights: dict[str, nn.Module], activation_dtype: str) -> dict[str, list[dict]]:
    """ORT TensorQuantOverrides: each quantized layer's weight codes/scales and its input's scale."""
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    by_param = {}
    for name, layer in weights.items():
        for candidate in (f"module.{name}", name):
            if candidate in inits:
                by_param[candidate] = layer
                break
    zp_type = np.uint8 if activation_dtype == "uint8" else np.int8
    out: dict[str, list[dict]] = {}
    for node in m.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in by_param:
            continue
        layer = by_param[node.input[1]]
        wq = layer.weight_quantizer
        transposed = node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute)
        if transposed:
            continue  # a Gemm with [in, out] weights: its channels lie on axis 1; ORT's own scales serve
        scales = wq.scale.detach().float().reshape(-1).numpy()
        out[node.input[1]] = [{"axis": 0, "scale": np.array(s, np.float32), "zero_point": np.array(0, np.int8)}
                               for s in scales]
        iq = getattr(layer, "input_quantizer", None)
        # a scale at the quantizer's floor (1e-8) would zero a vanishing signal (random-init networks whose
        # activations shrink stage by stage): ORT's calibrator keeps the true range there
        if (iq is not None and iq.enabled and iq.calibrated and node.input[0] not in out
                and float(iq.scale.reshape(())) > 1e-8):
            zero = int(round(float(iq.zero_point.reshape(()))))
            if activation_dtype != "uint8":
                zero -= 128 if not iq.symmetric else 0
            out[node.input[0]] = [{"scale": np.array(float(iq.scale.reshape(())), np.float32),
                              "zero_point": np.array(zero, zp_type)}]
    return out


def export_placed(
    model: nn.Module,
    example: Any,
    path: Path | str,
    calibration: Sequence[dict[str, np.ndarray]],
    *,
    input_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
    activation_dtype: str = "uint8",
    weight_reduce_range: bool = False,
    calibrate_method: str = "minmax",
    opset: int = 17,
) -> dict[str, Any]:
    """Export the fake-quant ``model`` as QDQ ONNX at ``path`` with ONNX Runtime's conv placement and
    modelpress's weights and input scales (module doc). ``calibration``: ONNX feeds for ORT's calibrator
    (the tensors modelpress did not calibrate). Returns what was overridden."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = Path(path).resolve()
    twin, weights = float_twin(model)
    raw, pre = path.with_suffix(".float.onnx"), path.with_suffix(".pre.onnx")
    try:
        export_float(twin, example, raw, input_names, dynamic_axes, opset)
        # ORT's symbolic shape inference dumps "sym_shape_infer_temp.onnx" (and its external data) into the
        # working directory when it gives up: run it in a scratch directory, never the user's
        with tempfile.TemporaryDirectory(prefix="modelpress-shapes-") as scratch, contextlib.chdir(scratch):
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    quant_pre_process(str(raw), str(pre), skip_symbolic_shape=False)
            except Exception:  # symbolic shape inference fails on some graphs: ONNX's own inference then
                quant_pre_process(str(raw), str(pre), skip_symbolic_shape=True)
        overrides = _overrides(pre, weights, activation_dtype)
        feeds = list(calibration)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = iter(feeds)

            def get_next(self) -> dict | None:
                return next(self._it, None)

        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[calibrate_method]
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quantize_static(
                str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(FUSED_OPS),
                per_channel=True, reduce_range=weight_reduce_range,
                activation_type=QuantType.QUInt8 if activation_dtype == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8, calibrate_method=method,
                extra_options={"WeightSymmetric": True, "TensorQuantOverrides": overrides},
            )
    finally:
        raw.unlink(missing_ok=True)
        pre.unlink(missing_ok=True)
    n_weights = sum(1 for v in overrides.values() if "axis" in v[0])
    return {"placement": "onnxruntime-qdq", "weights_overridden": n_weights,
            "inputs_overridden": len(overrides) - n_weights, "quantized_layers": len(weights),
            "calibrate_method": calibrate_method}
