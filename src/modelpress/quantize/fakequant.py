"""Fake-quant wrappers (Linear and GPT-2's transposed Conv1D, Conv2d, attention matmuls), policy-driven wrapping and calibration.

``wrap_model(model, policy, config)`` replaces each quantizable layer in place by a wrapper that keeps the
original parameters and adds a weight quantizer (symmetric, per output channel) and an input-activation
quantizer (asymmetric, per tensor); Hugging Face attention modules get ``attn_qk`` / ``attn_pv``
QuantMatMul modules (see hf_attention). ``calibrate(model, batches, reporter)`` runs the calibration
batches with every activation quantizer observing, then sets their scales.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.graph.adapters import is_transposed_linear
from modelpress.graph.run import call_module, eval_mode
from modelpress.quantize import hf_attention
from modelpress.quantize.observers import calibrate_weight, make_observer
from modelpress.quantize.policy import LayerSpec, Policy
from modelpress.quantize.quantizers import (
    Log2Quantizer,
    LogSqrt2Quantizer,
    UniformQuantizer,
    _LogQuantizerBase,
    export_active,
    export_channel_quantize,
    export_reparam_qdq,
    export_weight_t,
)

Quantizer = UniformQuantizer | _LogQuantizerBase


@dataclass
class QuantConfig:
    """How wrapped layers quantize (the per-layer bits come from the Policy).

    weight_observer / act_observer: "minmax", "percentile" or "mse". probs: quantizer for attention
    probabilities ("uniform", "log2" or "logsqrt2"). attention: quantize the two attention matmuls.
    weight_reduce_range: weights use one bit less (7-bit codes in int8), which keeps U8S8 integer kernels
    exact on CPUs without VNNI. symmetric_activations: signed activation codes with zero point 0 (what
    TensorRT's explicit quantization requires); asymmetric (unsigned) ones fit ONNX Runtime's U8S8 kernels.
    """

    weight_observer: str = "minmax"
    act_observer: str = "percentile"
    act_observer_kwargs: dict[str, Any] = field(default_factory=dict)
    attention: bool = True
    probs: str = "uniform"
    weight_reduce_range: bool = False
    symmetric_activations: bool = False


def layer_quantizers(
    w_bits: int | None, a_bits: int | None, weight_reduce_range: bool = False, act_symmetric: bool = False
) -> tuple[UniformQuantizer | None, UniformQuantizer | None]:
    """(weight, input) quantizers of a Linear/Conv layer: symmetric narrow per-output-channel weights
    (one bit less with ``weight_reduce_range``), a per-tensor input; None keeps that side float."""
    wb = None if w_bits is None else max(2, w_bits - (1 if weight_reduce_range else 0))
    wq = None if wb is None else UniformQuantizer(wb, symmetric=True, axis=0, narrow=True)
    iq = None if a_bits is None else UniformQuantizer(a_bits, symmetric=act_symmetric)
    return wq, iq


class QuantLinear(nn.Module):
    """nn.Linear with quantized weights (per output channel) and a quantized input.

    ``input_scale``/``input_shift`` (optional buffers) apply ``x * input_scale + input_shift`` per input
    channel before the input quantizer: the consumer-side form of scale reparameterization, used where a
    norm's output is also read by something other than its consumer Linears (post-norm residuals).

    A transposed linear (transformers' ``Conv1D`` in GPT-2, weight [in, out]) is wrapped too: its weight
    is taken over as an [out, in] copy, so everything downstream (reparameterization, GPTQ, QDQ export,
    the saved state) sees one layout; the wrapper's state-dict weight is then [out, in].
    """

    def __init__(
        self,
        linear: nn.Module,
        w_bits: int | None = 8,
        a_bits: int | None = 8,
        weight_reduce_range: bool = False,
        act_symmetric: bool = False,
        own_weight: bool = False,
    ) -> None:
        super().__init__()
        self.own_weight = own_weight
        if is_transposed_linear(linear):
            weight = linear.weight
            self.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
            self.in_features, self.out_features = int(weight.shape[0]), int(weight.shape[1])
        else:
            self.in_features, self.out_features = linear.in_features, linear.out_features
            # a weight tied to another module (an LM head tied to the input embedding) is copied: scale
            # folding and GPTQ rewrite this layer's weight and must not change the embedding
            self.weight = nn.Parameter(linear.weight.detach().clone()) if own_weight else linear.weight
        self.bias = linear.bias
        self.weight_quantizer, self.input_quantizer = layer_quantizers(
            w_bits, a_bits, weight_reduce_range, act_symmetric
        )
        self.register_buffer("input_scale", None)
        self.register_buffer("input_shift", None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_quantizer is None:
            return self.weight
        return self.weight_quantizer(self.weight)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale + self.input_shift
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        iq = self.input_quantizer
        if (
            export_channel_quantize()
            and self.input_scale is not None
            and iq is not None
            and iq.enabled
            and iq.calibrated
            and iq.channel_scale is not None
        ):
            x = export_reparam_qdq(iq, x)  # per-channel Q, per-tensor DQ: no multiply-add in the graph
        else:
            x = self.prepare_input(x)
            if iq is not None:
                x = iq(x)
        wq = self.weight_quantizer
        if export_active() and wq is not None and wq.enabled and wq.calibrated:
            out = torch.matmul(x, export_weight_t(wq, self.weight))
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantConv2d(nn.Module):
    """nn.Conv2d with quantized weights (per output channel) and a quantized input (per tensor)."""

    def __init__(
        self,
        conv: nn.Conv2d,
        w_bits: int | None = 8,
        a_bits: int | None = 8,
        weight_reduce_range: bool = False,
        act_symmetric: bool = False,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.weight_quantizer, self.input_quantizer = layer_quantizers(
            w_bits, a_bits, weight_reduce_range, act_symmetric
        )

    @property
    def weight(self) -> nn.Parameter:
        return self.conv.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.conv.bias

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        if wq is None:
            return self.conv.weight
        if export_active() and wq.enabled and wq.calibrated:
            return export_weight_t(wq, self.conv.weight, transpose=False)
        return wq(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self.conv._conv_forward(x, self.quantized_weight(), self.conv.bias)


class QuantMatMul(nn.Module):
    """``a @ b`` with both operands quantized (attention: QK^T and probs @ V)."""

    def __init__(self, a_quantizer: Quantizer | None, b_quantizer: Quantizer | None) -> None:
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.a_quantizer is not None:
            a = self.a_quantizer(a)
        if self.b_quantizer is not None:
            b = self.b_quantizer(b)
        return torch.matmul(a, b)


QUANT_LAYERS = (QuantLinear, QuantConv2d, QuantMatMul)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _probs_quantizer(kind: str, bits: int, symmetric: bool = False) -> Quantizer:
    if kind == "uniform":
        return UniformQuantizer(bits, symmetric=symmetric)
    if kind == "log2":
        return Log2Quantizer(bits)
    if kind == "logsqrt2":
        return LogSqrt2Quantizer(bits)
    raise ValueError(f"unknown probability quantizer {kind!r}: use uniform, log2 or logsqrt2")


def wrap_model(
    model: nn.Module, policy: Policy | dict | None = None, config: QuantConfig | None = None
) -> dict[str, LayerSpec]:
    """Replace quantizable layers in place according to ``policy``; returns {layer name: spec} applied.

    Weight quantizers are calibrated right away (from the weights); activation quantizers wait for
    ``calibrate``.
    """
    config = config or QuantConfig()
    policy = policy if isinstance(policy, Policy) else Policy(policy)
    applied: dict[str, LayerSpec] = {}
    # a module registered under several names (shared weights) gets one wrapper, seen by every parent
    wrappers: dict[int, nn.Module] = {}
    holders = Counter(id(p) for mod in model.modules() for p in mod.parameters(recurse=False))
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if id(m) in wrappers:
            _set_submodule(model, name, wrappers[id(m)])
            continue
        linear = isinstance(m, nn.Linear) or is_transposed_linear(m)
        if linear or isinstance(m, nn.Conv2d):
            spec = policy.spec(name)
            if spec.is_float:
                applied[name] = spec
                continue
            tied = linear and not is_transposed_linear(m) and holders[id(m.weight)] > 1
            kwargs = {"own_weight": True} if tied else {}
            cls = QuantLinear if linear else QuantConv2d
            wrapped = cls(
                m,
                spec.w_bits,
                spec.a_bits,
                weight_reduce_range=config.weight_reduce_range,
                act_symmetric=config.symmetric_activations,
                **kwargs,
            )
            if wrapped.weight_quantizer is not None:
                calibrate_weight(wrapped.weight_quantizer, wrapped.weight.detach(), config.weight_observer)
            _set_submodule(model, name, wrapped)
            wrappers[id(m)] = wrapped
            applied[name] = spec
    if config.attention:
        attn = hf_attention.attention_modules(model)
        for name, m in attn:
            for which in ("attn_qk", "attn_pv"):
                spec = policy.spec(f"{name}.{which}")
                applied[f"{name}.{which}"] = spec
                if spec.a_bits is None:
                    continue
                bits = spec.a_bits
                if which == "attn_qk":
                    mm = QuantMatMul(
                        UniformQuantizer(bits, symmetric=True), UniformQuantizer(bits, symmetric=True)
                    )
                else:
                    mm = QuantMatMul(
                        _probs_quantizer(config.probs, bits, config.symmetric_activations),
                        UniformQuantizer(bits, symmetric=True),
                    )
                setattr(m, which, mm)
        if attn:
            hf_attention.enable(model)
    return applied


def quant_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            yield name, m


def activation_quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """Distinct input/operand quantizers (a quantizer shared by several layers appears once)."""
    seen, out = set(), []
    for name, m in quant_layers(model):
        pairs = (
            [("a_quantizer", m.a_quantizer), ("b_quantizer", m.b_quantizer)]
            if isinstance(m, QuantMatMul)
            else [("input_quantizer", m.input_quantizer)]
        )
        for attr, q in pairs:
            if q is not None and id(q) not in seen:
                seen.add(id(q))
                out.append((f"{name}.{attr}", q))
    return out


def weight_quantizers(model: nn.Module) -> list[tuple[str, nn.Module, UniformQuantizer]]:
    return [
        (name, m, m.weight_quantizer)
        for name, m in quant_layers(model)
        if not isinstance(m, QuantMatMul) and m.weight_quantizer is not None
    ]


def set_quant_state(model: nn.Module, weights: bool = True, activations: bool = True) -> None:
    """Switch weight and activation quantization on or off (off: the layer computes in float)."""
    for _, _, q in weight_quantizers(model):
        q.enabled = weights
    for _, q in activation_quantizers(model):
        q.enabled = activations


def forward_all(
    model: nn.Module, batches: Iterable[Any], reporter: Any = None, description: str = ""
) -> None:
    items = list(batches)
    it = items if reporter is None else reporter.track(items, description or "running", total=len(items))
    with torch.no_grad():
        for b in it:
            call_module(model, b)


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    reporter: Any = None,
    observer: str = "percentile",
    observer_kwargs: dict[str, Any] | None = None,
    only: Iterable[Quantizer] | None = None,
    recalibrate: bool = False,
) -> int:
    """Calibrate activation quantizers on ``batches`` (dicts of tensors passed as kwargs, or tensors).

    Observation runs in float (all quantizers pass their input through while recording it). Uniform
    quantizers get their range from ``observer``; a quantizer with ``axis`` set is calibrated per channel.
    Log quantizers take the observed maximum as scale. Returns the number of quantizers calibrated.
    ``only`` restricts calibration to the given quantizers; already calibrated ones are skipped unless
    ``recalibrate``.
    """
    kwargs = dict(observer_kwargs or {})
    wanted = None if only is None else {id(q) for q in only}
    targets = []
    for _, q in activation_quantizers(model):
        if wanted is not None and id(q) not in wanted:
            continue
        if q.calibrated and not recalibrate and wanted is None:
            continue
        if isinstance(q, UniformQuantizer):
            q.observer = make_observer(observer, axis=q.axis, **kwargs)
        else:
            q.observer = make_observer("minmax")
        targets.append(q)
    if not targets:
        return 0
    try:
        with eval_mode(model):
            forward_all(model, batches, reporter, "calibrating activations")
    finally:
        for q in targets:
            obs, q.observer = q.observer, None
            if obs.min is None:
                continue  # never reached (unused branch)
            if isinstance(q, UniformQuantizer):
                obs.apply(q)
            else:
                q.set_scale(torch.clamp(obs.max.max(), min=1e-8))
    return len(targets)


def calibrate_weights(model: nn.Module, method: str = "minmax") -> None:
    """(Re)compute every weight quantizer's per-channel scales from the current weights."""
    for _, m, q in weight_quantizers(model):
        calibrate_weight(q, m.weight.detach(), method)


def is_fake_quant(model: nn.Module) -> bool:
    """True if ``model`` holds fake-quant layers (export it with modelpress.quantize.qdq.export_qdq)."""
    return any(isinstance(m, QUANT_LAYERS) for m in model.modules())
