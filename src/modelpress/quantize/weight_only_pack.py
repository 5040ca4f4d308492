"""Packed weight-only layers: 4- or 8-bit codes per block of input columns, stored the way ONNX Runtime's
``com.microsoft.MatMulNBits`` reads them, so the saved torch model and the ONNX file hold the same bytes.

Layout (ONNX Runtime's contrib-operator spec for MatMulNBits, K = input width, N = output width):

* ``qweight``: uint8 ``[N, k_blocks, block_size * bits / 8]``, ``k_blocks = ceil(K / block_size)``; the codes of
  one output row, in input order, two 4-bit codes per byte with the *lower* input index in the low nibble
  (8-bit: one code per byte). A last block that ``block_size`` does not fill is padded with the zero point's
  code (it multiplies nothing: the activation has K columns).
* ``scales``: float ``[N, k_blocks]``; ``zero_points``: uint8 ``[N, ceil(k_blocks * bits / 8)]``, packed the
  same way along the blocks (absent: the midpoint ``2^(bits-1)``, i.e. symmetric codes).
* value = ``(code - zero_point) * scale``.

``WeightOnlyLinear`` (a Linear or GPT-2 ``Conv1D`` with packed weights, optional per-input-channel ``input_scale``
for activation-aware scales that could not be folded away) and ``WeightOnlyEmbedding`` (rows gathered from the
same packed form: a tied embedding and LM head share one set of buffers) compute in float from the codes.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import ModelpressError

SUPPORTED_BITS = (4, 8)
# set while exporting: WeightOnlyLinear then traces to com.microsoft.MatMulNBits (see weight_only_export)
_EXPORTING: ContextVar[bool] = ContextVar("modelpress_weight_only_export", default=False)


def check_layout(bits: int, block_size: int) -> None:
    """Refuse what MatMulNBits cannot hold (bits 4 or 8; a power-of-two block of at least 16)."""
    if bits not in SUPPORTED_BITS:
        raise ModelpressError(f"weight-only quantization supports 4 or 8 bits, got {bits}", "use bits: 4 or 8")
    if block_size < 16 or block_size & (block_size - 1):
        raise ModelpressError(f"block_size must be a power of two >= 16, got {block_size}",
                              "use 32, 64 or 128 (ONNX Runtime's MatMulNBits block sizes)")


def k_blocks(in_features: int, block_size: int) -> int:
    return math.ceil(in_features / block_size)


# ---------------------------------------------------------------------------------------------- packing
def pack_codes(codes: torch.Tensor, bits: int, block_size: int, pad: torch.Tensor | int = 0) -> torch.Tensor:
    """Unsigned codes [N, K] (0..2^bits-1) -> uint8 [N, k_blocks, block_size * bits / 8].

    ``pad``: the code written into the padding of a last partial block (per row and block: a tensor
    [N, k_blocks] of zero points, or one int)."""
    n, k = codes.shape
    kb = k_blocks(k, block_size)
    full = torch.empty(n, kb * block_size, dtype=torch.uint8)
    if isinstance(pad, torch.Tensor):
        full.copy_(pad.to(torch.uint8).repeat_interleave(block_size, dim=1))
    else:
        full.fill_(int(pad))
    full[:, :k] = codes.to(torch.uint8)
    full = full.reshape(n, kb, block_size)
    if bits == 8:
        return full.contiguous()
    pairs = full.reshape(n, kb, block_size // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """uint8 [..., k_blocks, blob] -> int32 codes [..., K] (traceable with integer arithmetic only)."""
    p = packed.to(torch.int32)
    if bits == 4:
        p = torch.stack((p % 16, torch.div(p, 16, rounding_mode="floor")), dim=-1)
    flat = p.reshape(*packed.shape[:-2], -1)
    return flat[..., :in_features]


def pack_zero_points(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [N, k_blocks] -> uint8 [N, ceil(k_blocks * bits / 8)] (4-bit: two per byte, low first; an
    odd count pads the last high nibble with 0)."""
    z = zero.to(torch.uint8)
    if bits == 8:
        return z.contiguous()
    n, kb = z.shape
    if kb % 2:
        z = torch.cat([z, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
    z = z.reshape(n, -1, 2)
    return (z[..., 0] | (z[..., 1] << 4)).contiguous()


def unpack_zero_points(packed: torch.Tensor, bits: int, blocks: int) -> torch.Tensor:
    """uint8 [..., ceil(blocks * bits / 8)] -> int32 [..., blocks]."""
    p = packed.to(torch.int32)
    if bits == 4:
        p = torch.stack((p % 16, torch.div(p, 16, rounding_mode="floor")), dim=-1).reshape(*packed.shape[:-1], -1)
    return p[..., :blocks]


# ----------------------------------------------------------------------------------------- quantization
def block_params(w: torch.Tensor, bits: int, block_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scales and zero points of ``w`` [N, K] per block of ``block_size`` input columns:
    (scales [N, k_blocks] float32, zero points [N, k_blocks] int64 in 0..2^bits-1).

    Asymmetric: the block's [min, max] widened to include 0 (zero stays exact). Symmetric: codes
    ``-2^(bits-1) .. 2^(bits-1)-1`` stored offset by the midpoint (the zero point MatMulNBits assumes)."""
    n, k = w.shape
    kb = k_blocks(k, block_size)
    wd = w.detach().double()
    padded = F.pad(wd, (0, kb * block_size - k)).reshape(n, kb, block_size)
    cols = torch.arange(kb * block_size).reshape(kb, block_size) < k
    lo = torch.where(cols, padded, torch.inf).amin(-1).clamp(max=0)
    hi = torch.where(cols, padded, -torch.inf).amax(-1).clamp(min=0)
    qmax = 2**bits - 1
    mid = 2 ** (bits - 1)
    if symmetric:
        scale = torch.maximum(-lo, hi) / (mid - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, mid)
    else:
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale.float(), zero.long()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Codes of ``w`` [N, K] on the grid (scale, zero) [N, k_blocks]: int64 in 0..2^bits-1."""
    k = w.shape[1]
    s = scale.double().repeat_interleave(block_size, dim=1)[:, :k]
    z = zero.double().repeat_interleave(block_size, dim=1)[:, :k]
    return torch.clamp(torch.round(w.double() / s) + z, 0, 2**bits - 1).long()


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, block_size: int) -> torch.Tensor:
    """(codes - zero) * scale, blocks expanded along the last axis (float32)."""
    k = codes.shape[-1]
    s = scale.repeat_interleave(block_size, dim=-1)[..., :k]
    z = zero.repeat_interleave(block_size, dim=-1)[..., :k]
    return (codes - z).to(s.dtype) * s


# ---------------------------------------------------------------------------------------------- modules
class _Packed(nn.Module):
    """Packed codes, scales and zero points of a [rows, in_features] matrix (buffers)."""

    def __init__(self, rows: int, in_features: int, bits: int, block_size: int, symmetric: bool) -> None:
        super().__init__()
        check_layout(bits, block_size)
        self.bits, self.block_size, self.symmetric = int(bits), int(block_size), bool(symmetric)
        self.in_features = int(in_features)
        kb = k_blocks(in_features, block_size)
        self.register_buffer("qweight", torch.zeros(rows, kb, block_size * bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(rows, kb))
        zp = None if symmetric else torch.zeros(rows, math.ceil(kb * bits / 8), dtype=torch.uint8)
        self.register_buffer("zero_points", zp)

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Store unsigned codes [rows, K] with their block scales and zero points [rows, k_blocks]."""
        self.qweight.copy_(pack_codes(codes, self.bits, self.block_size, pad=zero))
        self.scales.copy_(scale.to(self.scales.dtype))
        if self.zero_points is not None:
            self.zero_points.copy_(pack_zero_points(zero, self.bits))

    def zeros(self) -> torch.Tensor:
        kb = self.scales.shape[1]
        if self.zero_points is None:
            return torch.full((self.scales.shape[0], kb), 2 ** (self.bits - 1), dtype=torch.int32)
        return unpack_zero_points(self.zero_points, self.bits, kb)

    def dequantized_weight(self) -> torch.Tensor:
        """The [rows, in_features] float weight these codes stand for."""
        codes = unpack_codes(self.qweight, self.bits, self.in_features)
        return dequantize(codes, self.scales, self.zeros(), self.block_size)

    def share_from(self, other: _Packed) -> None:
        """Use ``other``'s buffers (one tensor for a tied embedding and LM head)."""
        for name in ("qweight", "scales", "zero_points"):
            self._buffers[name] = other._buffers[name]

    def represented_weights(self) -> tuple[torch.Tensor, int]:
        """The tensor holding the codes and how many weights they stand for (``rows x in_features``): what a
        parameter count reports for this layer (the codes are buffers; a tied pair shares one tensor)."""
        return self.qweight, self.qweight.shape[0] * self.in_features

    def packed_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.qweight, self.scales, self.zero_points) if b is not None)


class WeightOnlyLinear(_Packed):
    """A Linear (or GPT-2 Conv1D) with packed block-quantized weights; activations stay float.

    ``input_scale`` (optional, [in_features]): multiplies the input first (activation-aware scales that had no
    exact place to fold into). Exported as ``com.microsoft.MatMulNBits`` (see weight_only_export)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, block_size: int = 32,
                 symmetric: bool = False, bias: bool = True) -> None:
        super().__init__(out_features, in_features, bits, block_size, symmetric)
        self.out_features = int(out_features)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("input_scale", None)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"block_size={self.block_size}, {kind}, input_scale={self.input_scale is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        if _EXPORTING.get():
            out = matmul_nbits(x, self)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


class WeightOnlyEmbedding(_Packed):
    """An embedding table with packed block-quantized rows (each row's codes along the embedding width)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 4, block_size: int = 32,
                 symmetric: bool = False, padding_idx: int | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, bits, block_size, symmetric)
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = padding_idx

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, block_size={self.block_size}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if _EXPORTING.get():
            return gather_block_quantized(ids, self)
        return self.gather(ids)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """The float rows of ``ids`` from the packed codes (the reference of the exported GatherBlockQuantized)."""
        # per block, without repeat_interleave (its export bakes the example's batch size into the graph)
        kb = self.scales.shape[1]
        p = self.qweight[ids].to(torch.int32)  # [*ids, k_blocks, blob]
        if self.bits == 4:
            p = torch.stack((p % 16, torch.div(p, 16, rounding_mode="floor")), dim=-1)
        p = p.reshape(*ids.shape, kb, self.block_size)
        scale = self.scales[ids].unsqueeze(-1)
        if self.zero_points is not None:  # gathered packed, then unpacked: no unpacked table in the export
            zero = unpack_zero_points(self.zero_points[ids], self.bits, kb).unsqueeze(-1)
        else:
            zero = torch.full_like(scale, float(2 ** (self.bits - 1)))
        out = (p - zero).to(scale.dtype) * scale
        return out.reshape(*ids.shape, kb * self.block_size)[..., : self.in_features]


def is_weight_only(model: nn.Module) -> bool:
    """Whether ``model`` holds packed weight-only layers."""
    return any(isinstance(m, _Packed) for m in model.modules())


class _MatMulNBits(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zero_points: Any,  # noqa: ANN401
                layer: Any) -> torch.Tensor:
        return torch.matmul(x, layer.dequantized_weight().to(x.dtype).t())

    @staticmethod
    def symbolic(g: Any, x: Any, qweight: Any, scales: Any, zero_points: Any, layer: Any) -> Any:  # noqa: ANN401
        inputs = [x, qweight, scales] + ([zero_points] if layer.zero_points is not None else [])
        out = g.op("com.microsoft::MatMulNBits", *inputs, K_i=layer.in_features, N_i=layer.out_features,
                   bits_i=layer.bits, block_size_i=layer.block_size, accuracy_level_i=0)
        with contextlib.suppress(Exception):  # the output's type for the exporter's shape inference
            sizes = x.type().varyingSizes()
            out.setType(x.type().with_sizes([*sizes[:-1], layer.out_features]))
        return out


class _GatherBlockQuantized(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zero_points: Any,  # noqa: ANN401
                table: Any) -> torch.Tensor:
        return table.gather(ids)

    @staticmethod
    def symbolic(g: Any, ids: Any, qweight: Any, scales: Any, zero_points: Any, table: Any) -> Any:  # noqa: ANN401
        # the packed rows [N, k_blocks, blob] seen as [N, k_blocks * blob]: the same initializer MatMulNBits reads
        # for a tied LM head (a Reshape ONNX Runtime folds), one tensor in the file
        rows = g.op("Reshape", qweight, g.op("Constant", value_t=torch.tensor([table.num_embeddings, -1])))
        inputs = [rows, ids, scales] + ([zero_points] if table.zero_points is not None else [])
        out = g.op("com.microsoft::GatherBlockQuantized", *inputs, bits_i=table.bits, block_size_i=table.block_size,
                   gather_axis_i=0, quantize_axis_i=1)
        padded = table.scales.shape[1] * table.block_size
        if padded != table.embedding_dim:  # a last block the width does not fill: its padding cut off
            out = g.op("Slice", out, g.op("Constant", value_t=torch.tensor([0])),
                       g.op("Constant", value_t=torch.tensor([table.embedding_dim])),
                       g.op("Constant", value_t=torch.tensor([-1])))
        with contextlib.suppress(Exception):  # the output's type for the exporter's shape inference
            out.setType(scales.type().with_sizes([*ids.type().varyingSizes(), table.embedding_dim]))
        return out


def gather_block_quantized(ids: torch.Tensor, table: WeightOnlyEmbedding) -> torch.Tensor:
    """Rows ``ids`` of a packed table, traced to ``com.microsoft.GatherBlockQuantized`` (one op where the integer
    unpacking took 14) over the table's own packed buffers."""
    return _GatherBlockQuantized.apply(ids, table.qweight, table.scales, table.zero_points, table)


def matmul_nbits(x: torch.Tensor, layer: WeightOnlyLinear) -> torch.Tensor:
    """``x @ W^T`` of a packed layer, traced to MatMulNBits (bias left outside; folded in after export)."""
    return _MatMulNBits.apply(x, layer.qweight, layer.scales, layer.zero_points, layer)
