"""log-sqrt2 -> log2 reparameterization of quantized attention probabilities (RepQ-ViT).

A log-sqrt2 code q stands for ``s * sqrt(2)**-q``. Writing ``k = ceil(q / 2)``:

    sqrt(2)**-q = 2**-k            (q even)
                = 2**-k * sqrt(2)  (q odd)

so ``A_hat @ V = s * (E @ V + sqrt(2) * O @ V)`` where E and O hold ``2**-k`` at the even and odd codes
(zero elsewhere): every product with V is a bit shift (log2 quantization), and the odd-code partial sum
takes one constant factor, folded into the output scale. ``Log2ShiftMatMul`` computes this form (in
float, or exactly in integers for integer V codes) and replaces the calibration-time QuantMatMul.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modelpress.quantize.fakequant import QuantMatMul
from modelpress.quantize.quantizers import LogSqrt2Quantizer, export_active

SQRT2 = math.sqrt(2.0)


def split_even_odd(q: torch.Tensor, quantizer: LogSqrt2Quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, O): 2**-ceil(q/2) at even / odd codes, zero elsewhere (and at the zero code)."""
    shift, odd = quantizer.log2_parts(q)
    level = torch.where(shift < 0, torch.zeros_like(shift), torch.exp2(-shift.clamp(min=0)))
    return level * (1 - odd), level * odd


def log2_matmul(q: torch.Tensor, quantizer: LogSqrt2Quantizer, v: torch.Tensor) -> torch.Tensor:
    """``dequant(q) @ v`` computed in the log2 (bit-shift) form."""
    even, odd = split_even_odd(q, quantizer)
    return quantizer.scale * (torch.matmul(even, v) + SQRT2 * torch.matmul(odd, v))


def log2_matmul_integer(q: torch.Tensor, quantizer: LogSqrt2Quantizer, v_codes: torch.Tensor) -> tuple:
    """Integer form: returns (even_acc, odd_acc, frac_bits) with int64 accumulators such that
    ``dequant(q) @ v_codes == scale * (even_acc + sqrt(2) * odd_acc) / 2**frac_bits`` exactly.

    Each term is ``v << (frac_bits - k)``: shifts and adds only.
    """
    shift, odd = quantizer.log2_parts(q)
    frac_bits = int(shift.max().clamp(min=0).item())
    valid = shift >= 0
    mult = torch.where(
        valid, torch.pow(2, (frac_bits - shift.clamp(min=0)).long()), torch.zeros_like(shift).long()
    )
    odd = odd.long()
    v = v_codes.long()
    even_acc = torch.matmul(mult * (1 - odd), v)
    odd_acc = torch.matmul(mult * odd, v)
    return even_acc, odd_acc, frac_bits


class Log2ShiftMatMul(QuantMatMul):
    """Inference form of a QuantMatMul whose first operand used a LogSqrt2Quantizer."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.b_quantizer is not None:
            b = self.b_quantizer(b)
        if not (self.a_quantizer.enabled and self.a_quantizer.calibrated):
            return torch.matmul(a, b)
        if export_active():  # ONNX has no log2 QDQ: the quantizer exports its nearest runnable form
            return torch.matmul(self.a_quantizer(a), b)
        return log2_matmul(self.a_quantizer.quant(a), self.a_quantizer, b)


def reparameterize_log_sqrt2(model: nn.Module) -> int:
    """Replace every calibrated QuantMatMul with a log-sqrt2 first operand by its log2 form; returns the count."""
    count = 0
    for name, m in list(model.named_modules()):
        if (
            isinstance(m, QuantMatMul)
            and not isinstance(m, Log2ShiftMatMul)
            and isinstance(m.a_quantizer, LogSqrt2Quantizer)
            and m.a_quantizer.calibrated
        ):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Log2ShiftMatMul(m.a_quantizer, m.b_quantizer))
            count += 1
    return count
