"""Quantizers with explicit scales and zero points: uniform (affine) and logarithmic (log2, log-sqrt2).

A quantizer maps a float tensor to integer codes (``quant``), back to floats (``dequant``), and does both in
``forward`` (fake quantization, with a straight-through estimator for the rounding so that gradients reach
the input and, where learnable, the clipping range). Scales and zero points are buffers, so a calibrated
model saves and reloads them with its state dict and export reads them directly.

Conventions (the ones ONNX QuantizeLinear uses): ``q = clamp(round(x / s) + z, qmin, qmax)`` and
``x_hat = (q - z) * s``; ``round`` is round-half-to-even (torch.round, like ONNX). Per-channel quantizers
carry one scale and zero point per index of ``axis``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass

import torch
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) in the forward pass, identity gradient in the backward pass."""
    return (torch.round(x) - x).detach() + x


def qrange(bits: int, symmetric: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer code range: signed for symmetric quantizers, unsigned for asymmetric ones.

    ``narrow`` drops the most negative signed code (e.g. [-127, 127] at 8 bits) so that the range is
    symmetric around zero, as ONNX Runtime's weight quantizers do.
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be within 2..16, got {bits}")
    if symmetric:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return (lo + 1 if narrow else lo), hi
    return 0, 2**bits - 1


def quantizer_forward(q: nn.Module, x: torch.Tensor, export: Callable) -> torch.Tensor:
    """What every quantizer does with its input: record it while calibrating, pass it through while
    disabled or uncalibrated, trace its ONNX form (``export``) while exporting, else fake-quantize it."""
    if q.observer is not None:
        q.observer.update(x)
        return x
    if not (q.enabled and q.calibrated):
        return x
    if _EXPORT.get() is not None:
        return export(q, x)
    return q.fake_quant(x)


class UniformQuantizer(nn.Module):
    """Affine (asymmetric) or symmetric uniform quantizer, per tensor or per channel.

    bits: 2..8 (up to 16 accepted). symmetric: signed codes and zero point 0; otherwise unsigned codes
    and an integer zero point. axis: the channel axis for per-channel scales (negative axes count from
    the end), or None for one scale. narrow: symmetric range without the most negative code.

    Before calibration the quantizer is the identity (``calibrated`` is False); ``enabled = False`` makes
    it the identity at any time. ``set_range(lo, hi)`` sets scale and zero point from a clipping range
    (tensors shaped like the scale for per-channel quantizers).
    """

    def __init__(
        self, bits: int = 8, symmetric: bool = False, axis: int | None = None, narrow: bool = False
    ) -> None:
        super().__init__()
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.axis = axis
        self.narrow = bool(narrow)
        self.qmin, self.qmax = qrange(self.bits, self.symmetric, self.narrow)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        # Per-channel calibration parameters kept after a consumer-side scale reparameterization: export
        # then quantizes the *untransformed* input per channel and dequantizes per tensor (same codes).
        self.register_buffer("channel_scale", None)
        self.register_buffer("channel_zero", None)
        self.enabled = True
        self.calibrated = False
        self.observer = None  # set during calibration: forward then records its input and returns it

    # -- configuration --------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        where = "tensor" if self.axis is None else f"channel(axis={self.axis})"
        return f"bits={self.bits}, {kind}, per_{where}, range=[{self.qmin}, {self.qmax}]"

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor | float, hi: torch.Tensor | float) -> None:
        """Scale and zero point that map [lo, hi] (widened to include 0) onto the code range."""
        lo = torch.as_tensor(lo, dtype=torch.float32).detach().clone()
        hi = torch.as_tensor(hi, dtype=torch.float32).detach().clone()
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
        if self.symmetric:
            amax = torch.maximum(-lo, hi)
            # Symmetric codes use [-qmax, qmax] for positive values; scale from the positive side.
            scale = amax / float(self.qmax)
            zero = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / float(self.qmax - self.qmin)
            scale = torch.clamp(scale, min=1e-8)
            zero = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax)
        scale = torch.clamp(scale, min=1e-8)
        self.set_params(scale, zero)

    @torch.no_grad()
    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set scale and zero point directly (zero points are rounded to integers)."""
        scale = (
            torch.as_tensor(scale, dtype=torch.float32)
            .detach()
            .clone()
            .reshape(-1 if self.axis is not None else ())
        )
        zero = torch.as_tensor(zero_point, dtype=torch.float32).detach().clone().reshape(scale.shape)
        self.scale = scale.to(self.scale.device)
        self.zero_point = torch.round(zero).to(self.scale.device)
        self.calibrated = True

    def to_per_tensor(self, scale: torch.Tensor | float, zero_point: torch.Tensor | float) -> None:
        """Switch to one scale and zero point (used by scale reparameterization)."""
        self.axis = None
        self.set_params(torch.as_tensor(scale).reshape(()), torch.as_tensor(zero_point).reshape(()))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):  # noqa: ANN001
        # Calibrated scales may be per tensor or per channel: take the saved shapes, then load as usual.
        for name in ("scale", "zero_point", "channel_scale", "channel_zero"):
            key = prefix + name
            if key in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[key])
        if prefix + "scale" in state_dict:
            self.calibrated = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    # -- arithmetic -----------------------------------------------------------------------------------
    def _shape(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.axis is None or t.dim() == 0:
            return t
        axis = self.axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = -1
        return t.reshape(shape)

    def quant(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (as a float tensor holding integers)."""
        s, z = self._shape(x, self.scale), self._shape(x, self.zero_point)
        return torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax)

    def dequant(self, q: torch.Tensor) -> torch.Tensor:
        s, z = self._shape(q, self.scale), self._shape(q, self.zero_point)
        return (q - z) * s

    def fake_quant(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
    ):
        """Quantize-dequantize with a straight-through rounding; gradients reach x (inside the range)
        and ``scale``/``zero`` when they are given as differentiable tensors."""
        s = self._shape(x, self.scale if scale is None else scale)
        z = self._shape(x, self.zero_point if zero is None else zero)
        q = torch.clamp(round_ste(x / s) + z, self.qmin, self.qmax)
        return (q - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantizer_forward(self, x, _export_qdq)


def log_codes(x: torch.Tensor, scale: torch.Tensor | float, log_base: float, zero_code: float) -> torch.Tensor:
    """Codes ``round(-log2(x / scale) / log_base)`` clamped to [0, zero_code]; zero_code stands for 0."""
    q = torch.round(-torch.log2(torch.clamp(x / scale, min=1e-30)) / log_base)
    q = torch.clamp(q, min=0)
    return torch.where(q >= zero_code, torch.full_like(q, zero_code), q)


def log_levels(q: torch.Tensor, scale: torch.Tensor | float, log_base: float, zero_code: float) -> torch.Tensor:
    """Values of log codes: ``scale * 2**(-q * log_base)``, and 0 at the zero code."""
    levels = scale * torch.exp2(-q * log_base)
    return torch.where(q >= zero_code, torch.zeros_like(levels), levels)


class _LogQuantizerBase(nn.Module):
    """Logarithmic quantizer for values in [0, scale] (attention probabilities).

    Codes 0 .. 2**bits - 2 are levels ``scale * base**(-q)``; the last code stands for exact zero
    (values below the smallest level). ``base`` is 2 (log2) or sqrt(2) (log-sqrt2).
    """

    log_base: float = 1.0  # log2 of the base

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        self.bits = int(bits)
        self.register_buffer("scale", torch.ones(()))
        self.enabled = True
        self.calibrated = False
        self.observer = None  # set during calibration: forward then records its input and returns it

    @property
    def zero_code(self) -> int:
        return 2**self.bits - 1

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base=2**{self.log_base:g}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):  # noqa: ANN001
        if prefix + "scale" in state_dict:
            self.calibrated = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    @torch.no_grad()
    def set_scale(self, scale: torch.Tensor | float) -> None:
        self.scale = torch.as_tensor(scale, dtype=torch.float32).reshape(()).to(self.scale.device).clone()
        self.calibrated = True

    def quant(self, x: torch.Tensor) -> torch.Tensor:
        return log_codes(x, self.scale, self.log_base, self.zero_code)

    def dequant(self, q: torch.Tensor) -> torch.Tensor:
        return log_levels(q, self.scale, self.log_base, self.zero_code)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dequant(self.quant(x)) - x).detach() + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantizer_forward(self, x, export_log)


class Log2Quantizer(_LogQuantizerBase):
    """Levels scale * 2**-q: multiplications by a level are bit shifts."""

    log_base = 1.0


class LogSqrt2Quantizer(_LogQuantizerBase):
    """Levels scale * sqrt(2)**-q: twice the resolution of log2 for the large probabilities (RepQ-ViT).

    For inference it is reparameterized to log2 (see ``log2_parts`` and ``modelpress.quantize.log2``):
    ``sqrt(2)**-q = 2**-ceil(q/2) * (sqrt(2) if q is odd else 1)``, a bit shift plus one constant factor
    applied to the odd-code partial sums.
    """

    log_base = 0.5

    def log2_parts(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split codes into (shift = ceil(q/2), odd = q mod 2); zero codes get shift = -1 (marks zero)."""
        shift = torch.ceil(q / 2)
        odd = torch.remainder(q, 2)
        is_zero = q >= self.zero_code
        return torch.where(is_zero, torch.full_like(shift, -1), shift), torch.where(
            is_zero, torch.zeros_like(odd), odd
        )


# -- ONNX export hooks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportSettings:
    """How quantizers trace while ``export_mode`` is active (see there)."""

    activation_dtype: str = "uint8"  # "uint8" (U8S8) or "int8" (S8S8)
    channel_quantize: bool = False  # consumer-side reparameterization as a per-channel QuantizeLinear
    log_form: str = "uniform"  # how log2 / log-sqrt2 quantizers export (see ``LOG_FORMS``)


LOG_FORMS = {
    "uniform": "8-bit uniform QuantizeLinear/DequantizeLinear over the log quantizer's range [0, scale]: "
    "the nearest form ONNX Runtime runs with integer kernels (small probabilities round to 0 or 1/255 of "
    "the range instead of their power-of-two level)",
    "simulate": "the log quantizer's exact levels computed with float ONNX ops (Log, Round, Exp, Where) "
    "and a float MatMul: matches the torch simulation, runs everywhere, no integer kernel for the matmul",
}


# Export mode belongs to the thread (and asyncio task) that traces, not to the process: a search that
# exports one candidate while another thread runs fake-quant forwards (even of the same model) must
# not see each other's mode. A ContextVar gives every thread its own value.
_EXPORT: ContextVar[ExportSettings | None] = ContextVar("modelpress_quantizer_export", default=None)


def _settings() -> ExportSettings:
    return _EXPORT.get() or ExportSettings()


class export_mode:  # noqa: N801 - used as a context manager
    """Within this context quantizers trace to ONNX QuantizeLinear/DequantizeLinear (torch.onnx, TorchScript).

    The mode holds for the current thread only (a ``contextvars.ContextVar``): models run in other
    threads meanwhile keep fake-quantizing. Contexts nest; leaving one restores the previous mode.

    channel_quantize: export a consumer-side scale reparameterization as a per-channel QuantizeLinear
    followed by a per-tensor DequantizeLinear (same codes, no Mul/Add); off by default because ONNX
    Runtime's per-axis QuantizeLinear is far slower on CPU than a Mul, an Add and a per-tensor Q.
    """

    def __init__(
        self, activation_dtype: str = "uint8", channel_quantize: bool = False, log_form: str = "uniform"
    ) -> None:
        if activation_dtype not in ("uint8", "int8"):
            raise ValueError("activation_dtype must be 'uint8' or 'int8'")
        if log_form not in LOG_FORMS:
            raise ValueError(f"log_form must be one of {sorted(LOG_FORMS)}")
        self.activation_dtype = activation_dtype
        self.channel_quantize = channel_quantize
        self.log_form = log_form

        self._tokens: list[Token] = []

    def __enter__(self) -> export_mode:
        settings = ExportSettings(self.activation_dtype, self.channel_quantize, self.log_form)
        self._tokens.append(_EXPORT.set(settings))
        return self

    def __exit__(self, *exc: object) -> None:
        _EXPORT.reset(self._tokens.pop())


def export_active() -> bool:
    """Whether quantizers trace their ONNX form in this thread (inside ``export_mode``)."""
    return _EXPORT.get() is not None


def export_channel_quantize() -> bool:
    """Whether this thread's export writes consumer-side reparameterizations as per-channel Q."""
    settings = _EXPORT.get()
    return settings is not None and settings.channel_quantize


def _qdq_function(spec: dict) -> type[torch.autograd.Function]:
    """Fake quantization in torch; QuantizeLinear -> DequantizeLinear in the exported graph."""

    class QDQ(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            sc, zp, lo, hi = spec["fq"]
            return (torch.clamp(torch.round(x / sc) + zp, lo, hi) - zp) * sc

        @staticmethod
        def symbolic(g, x):  # noqa: ANN001, ANN205
            scale = g.op("Constant", value_t=spec["scale"])
            zero = g.op("Constant", value_t=spec["zero"])
            kwargs = {} if spec["axis"] is None else {"axis_i": spec["axis"]}
            if "clip" in spec:  # narrower than the 8-bit container: clamp to the real range first
                lo, hi = (g.op("Constant", value_t=torch.tensor(v, dtype=torch.float32)) for v in spec["clip"])
                x = g.op("Clip", x, lo, hi)
            q = g.op("QuantizeLinear", x, scale, zero, **kwargs)
            return g.op("DequantizeLinear", q, scale, zero, **kwargs)

    return QDQ


def _log_sim_function(spec: dict) -> type[torch.autograd.Function]:
    """A log quantizer's quantize-dequantize: torch's own arithmetic, float ONNX ops in the graph."""

    class LogSim(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205 - python floats: the traced forward reads no buffers
            args = (spec["scale"], spec["log_base"], spec["zero_code"])
            return log_levels(log_codes(x, *args), *args)

        @staticmethod
        def symbolic(g, x):  # noqa: ANN001, ANN205
            def const(v: float):  # noqa: ANN202
                return g.op("Constant", value_t=torch.tensor(v, dtype=torch.float32))

            scale, zero_code, base = spec["scale"], spec["zero_code"], spec["log_base"] * math.log(2.0)
            ratio = g.op("Max", g.op("Div", x, const(scale)), const(1e-30))
            q = g.op("Round", g.op("Mul", g.op("Log", ratio), const(-1.0 / base)))
            q = g.op("Min", g.op("Max", q, const(0.0)), const(zero_code))
            levels = g.op("Mul", g.op("Exp", g.op("Mul", q, const(-base))), const(scale))
            is_zero = g.op("GreaterOrEqual", q, const(zero_code))
            return g.op("Where", is_zero, const(0.0), levels)

    return LogSim


def export_log(q: _LogQuantizerBase, x: torch.Tensor) -> torch.Tensor:
    """Export form of a log2 / log-sqrt2 quantizer (ONNX has no logarithmic QDQ): see ``LOG_FORMS``."""
    if _settings().log_form == "simulate":
        spec = {
            "scale": float(q.scale),
            "zero_code": float(q.zero_code),
            "log_base": q.log_base,
        }
        return _log_sim_function(spec).apply(x)
    uniform = UniformQuantizer(8, symmetric=False)
    uniform.set_params(q.scale.detach() / float(uniform.qmax - uniform.qmin), torch.zeros(()))
    return _export_qdq(uniform, x)


def _weight_dq_function(spec: dict) -> type[torch.autograd.Function]:
    """DequantizeLinear of int8 codes in ONNX. Traced only (export mode): its torch value is a zero of the
    weight's (transposed) shape, since only the symbolic reaches the graph; computing the fake-quantized weight
    here made the trace hold four float copies of every weight (BERT-base: +1.85 GiB)."""

    class WeightDQ(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):  # noqa: ANN001, ANN205
            shape = (w.shape[1], w.shape[0]) if spec["transpose"] else w.shape
            return w.new_zeros(()).expand(shape)

        @staticmethod
        def symbolic(g, w):  # noqa: ANN001, ANN205
            codes = g.op("Constant", value_t=spec["codes"])
            scale = g.op("Constant", value_t=spec["scale"])
            zero = g.op("Constant", value_t=spec["zero"])
            kwargs = {} if spec["axis"] is None else {"axis_i": spec["axis"]}
            return g.op("DequantizeLinear", codes, scale, zero, **kwargs)

    return WeightDQ


def onnx_qparams(q: UniformQuantizer, dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Scale and zero point in the ONNX integer type ``dtype`` ("uint8" or "int8").

    Codes that fit the other type are shifted by 128 (same real values); ranges narrower than 8 bits
    cannot be expressed by ONNX's clamping and are refused for activations by the caller.
    """
    scale = q.scale.detach().float()
    zero = q.zero_point.detach()
    if dtype == "uint8":
        offset = 0 if q.qmin >= 0 else 128
        return scale, (zero + offset).to(torch.uint8), torch.uint8
    offset = 0 if q.qmin < 0 else -128
    return scale, (zero + offset).to(torch.int8), torch.int8


def _export_qdq(q: UniformQuantizer, x: torch.Tensor) -> torch.Tensor:
    """Per-tensor activation Q/DQ. Below 8 bits the codes travel in 8-bit containers: a Clip to the
    quantizer's real range before the QuantizeLinear gives exactly the narrow codes (ONNX Runtime and
    TensorRT have no sub-8-bit activation kernels)."""
    if q.bits > 8 or (q.axis is not None):
        raise NotImplementedError(
            f"only per-tensor activation quantizers of up to 8 bits export to ONNX QDQ (got {q.extra_repr()}); "
            "run scale reparameterization first, or keep this layer's input in float"
        )
    scale, zero, _ = onnx_qparams(q, _settings().activation_dtype)
    fq = (float(q.scale), float(q.zero_point), float(q.qmin), float(q.qmax))
    spec = {"fq": fq, "scale": scale.reshape(()), "zero": zero.reshape(()), "axis": None}
    if q.bits < 8:
        spec["clip"] = ((q.qmin - fq[1]) * fq[0], (q.qmax - fq[1]) * fq[0])
    return _qdq_function(spec).apply(x)


def _reparam_qdq_function(spec: dict) -> type[torch.autograd.Function]:
    """Per-channel QuantizeLinear then per-tensor DequantizeLinear: the reparameterized input in one pair."""

    class ReparamQDQ(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, cs, cz):  # noqa: ANN001, ANN205
            s, z, lo, hi = spec["fq"]
            return (torch.clamp(torch.round(x / cs) + cz, lo, hi) - z) * s

        @staticmethod
        def symbolic(g, x, cs, cz):  # noqa: ANN001, ANN205
            cscale = g.op("Constant", value_t=spec["channel_scale"])
            czero = g.op("Constant", value_t=spec["channel_zero"])
            scale = g.op("Constant", value_t=spec["scale"])
            zero = g.op("Constant", value_t=spec["zero"])
            q = g.op("QuantizeLinear", x, cscale, czero, axis_i=-1)
            return g.op("DequantizeLinear", q, scale, zero)

    return ReparamQDQ


def export_reparam_qdq(q: UniformQuantizer, x: torch.Tensor) -> torch.Tensor:
    """Export form of (consumer-side transform + per-tensor quantizer) on the raw input ``x``."""
    if q.bits != 8:
        raise NotImplementedError("only 8-bit activation quantizers export to ONNX QDQ")
    scale, zero, dt = onnx_qparams(q, _settings().activation_dtype)
    offset = int(zero.to(torch.int32)) - int(q.zero_point)
    cz = (q.channel_zero.detach() + offset).to(dt)
    spec = {
        "fq": (float(q.scale), float(q.zero_point), float(q.qmin), float(q.qmax)),
        "channel_scale": q.channel_scale.detach().float().clone(),
        "channel_zero": cz,
        "scale": scale.reshape(()),
        "zero": zero.reshape(()),
    }
    return _reparam_qdq_function(spec).apply(
        x, q.channel_scale.detach().clone(), q.channel_zero.detach().clone()
    )


def export_weight_t(q: UniformQuantizer, w: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """The quantized weight, exported as DequantizeLinear of int8 codes (per output channel).

    ``transpose``: a Linear weight as [in, out], so that the DequantizeLinear feeds MatMul directly
    (scales on axis 1); otherwise the weight keeps its layout (a Conv weight, scales on axis 0).
    """
    if not q.symmetric:
        raise NotImplementedError(
            "weight export expects symmetric weight quantizers (int8 codes, zero point 0)"
        )
    codes = q.quant(w.detach())
    codes = (codes.t() if transpose else codes).contiguous().to(torch.int8)
    scale = q.scale.detach().float().reshape(-1)
    per_channel = q.axis is not None and scale.numel() > 1
    zero = torch.zeros(scale.shape if per_channel else (), dtype=torch.int8)
    spec = {
        "codes": codes,
        "scale": scale if per_channel else scale.reshape(()),
        "zero": zero,
        "axis": (1 if transpose else 0) if per_channel else None,
        "transpose": transpose,
    }
    return _weight_dq_function(spec).apply(w)
