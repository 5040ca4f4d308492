"""Quantized weight reconstruction: GPTQ error compensation or AdaRound rounding, per layer or per block.

Both minimise a layer's output error on calibration inputs, ``||W X - W_q X||^2 = tr(D H D^T)`` with
``D = W - W_q`` and ``H = X X^T / n`` (X: the layer's *quantized* inputs, as inference sees them), over
weights on the quantizer's fixed per-channel grid:

* GPTQ quantizes input columns one at a time and spreads each column's rounding error over the columns
  not yet quantized, through the inverse Hessian (Cholesky form), in blocks of columns.
* AdaRound learns, for every weight, whether to round down or up (a rectified-sigmoid relaxation with an
  annealed regulariser that pushes it to 0/1), on the same quadratic loss.

Granularity ``"layer"``: one calibration pass collects every layer's H (inputs of the float-weight
model). ``"block"``: blocks are processed in order and each block's H comes from a pass in which all
earlier blocks already have their reconstructed quantized weights, so errors do not accumulate
unseen. The result replaces each layer's weight by its quantized values (on the grid of its weight
quantizer, whose scales stay fixed: do not re-calibrate weights afterwards). H is collected by
``modelpress.data.probes`` (the statistics pass the other methods share).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modelpress.data import probes
from modelpress.quantize.fakequant import QuantConv2d, QuantLinear, forward_all
from modelpress.quantize.quantizers import UniformQuantizer
from modelpress.system import release_freed_memory


def _grid_quant(w: torch.Tensor, scale: torch.Tensor, q: UniformQuantizer) -> torch.Tensor:
    """Quantize-dequantize w [rows, cols] with per-row scale [rows, 1] (zero point 0)."""
    return torch.clamp(torch.round(w / scale), q.qmin, q.qmax) * scale


def _row_scale(q: UniformQuantizer, rows: int) -> torch.Tensor:
    s = q.scale.detach().double()
    return (s.expand(rows) if s.dim() == 0 else s).reshape(-1, 1)


def block_stages(names: list[str], blocks: list[str] | None) -> list[tuple[list[str], str | None]]:
    """``names`` (layer paths, forward order) grouped into the stages sequential reconstruction runs: one per
    block path of ``blocks`` holding any (the block's path beside it), then the rest (path None); without
    blocks, one stage of all."""
    if not blocks:
        return [(list(names), None)] if names else []
    stages: list[tuple[list[str], str | None]] = []
    done: set[str] = set()
    for path in blocks:
        inside = [n for n in names if n.startswith(path + ".") and n not in done]
        if inside:
            stages.append((inside, path))
            done.update(inside)
    rest = [n for n in names if n not in done]
    if rest:
        stages.append((rest, None))
    return stages


def _inverse_cholesky_in_place(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor U of H^-1 (``U^T U = H^-1``), what GPTQ's column loop reads, computed in H's
    own memory (LAPACK's potrf, potri, potrf on the symmetric float64 ``h``, which is overwritten and returned):
    no second [cols, cols] matrix, where ``torch.linalg`` allocates one per factor."""
    from scipy.linalg import lapack

    if h.dtype != torch.float64 or not h.is_contiguous() or h.device.type != "cpu":
        h = h.double().contiguous().cpu()
    a = h.numpy().T  # the same memory, column-major: H is symmetric, so this is H
    out, info = lapack.dpotrf(a, lower=0, overwrite_a=1)
    if info == 0:
        out, info = lapack.dpotri(a, lower=0, overwrite_c=1)
    if info != 0 or not np.shares_memory(out, a):
        raise torch.linalg.LinAlgError(f"GPTQ: the damped Hessian is not positive definite (LAPACK info {info})")
    # potri wrote H^-1's upper triangle (column-major: h's lower triangle), the only one potrf reads
    out, info = lapack.dpotrf(a, lower=0, overwrite_a=1)
    if info != 0 or not np.shares_memory(out, a):
        raise torch.linalg.LinAlgError(f"GPTQ: the inverse Hessian is not positive definite (LAPACK info {info})")
    return h.tril_().T  # U in column-major upper = h's lower triangle; as [cols, cols] row-major: its transpose


def gptq_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: UniformQuantizer,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    column_quant: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """GPTQ on one Linear weight [out, in] given H [in, in]; returns the quantized (dequantized) weight.

    ``column_quant(column [out, 1], input index)``, when given, replaces the quantizer's per-row grid (e.g. a
    grid per block of input columns, fixed before the loop so that act-order keeps one grid per block);
    ``quantizer`` is then unused."""
    if column_quant is None and not quantizer.symmetric:
        raise ValueError("GPTQ here expects symmetric weight quantizers")
    w = weight.detach().double().clone()
    cols = w.shape[1]
    if column_quant is None:
        scale = _row_scale(quantizer, w.shape[0])

        def column_quant(col: torch.Tensor, _: int) -> torch.Tensor:
            return _grid_quant(col, scale, quantizer)
    # one working copy of H at a time (the permuted one when act-order permutes), the damping added on its
    # diagonal in place and each factor freed once the next is formed: a [3072, 3072] float64 H is 75 MB, and
    # the copies, an identity and the factors held together were BERT-base's peak of the whole compress
    h = hessian.detach().double()
    diag = torch.diagonal(h)
    dead = diag == 0
    perm = torch.argsort(torch.where(dead, 1.0, diag), descending=True) if act_order else None
    h = h[perm[:, None], perm] if perm is not None else h.clone()
    del diag
    if perm is not None:
        dead = dead[perm]
        w = w[:, perm]
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.mean(torch.diagonal(h)))
    hinv = _inverse_cholesky_in_place(h)
    out = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            qcol = column_quant(col, int(perm[i1 + i]) if perm is not None else i1 + i)
            out[:, i1 + i] = qcol[:, 0]
            e = (col - qcol) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i : i + 1, i:]
            err1[:, i] = e[:, 0]
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        out = out[:, torch.argsort(perm)]
    return out.to(weight.dtype)


def adaround_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: UniformQuantizer,
    iters: int = 300,
    lr: float = 1e-2,
    reg: float = 0.01,
    seed: int = 0,
) -> torch.Tensor:
    """AdaRound on one Linear weight [out, in] with the quadratic loss tr(D H D^T); returns W_q."""
    torch.manual_seed(seed)
    w = weight.detach().float()
    h = hessian.detach().float()
    scale = _row_scale(quantizer, w.shape[0]).float()
    zeta, gamma = 1.1, -0.1
    floor = torch.floor(w / scale)
    rest = (w / scale - floor).clamp(1e-4, 1 - 1e-4)
    # start at the rectified sigmoid's inverse of the fractional part (soft rounding = the float weight)
    v = (-torch.log((zeta - gamma) / (rest - gamma) - 1)).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    norm = torch.einsum("oi,ij,oj->", w, h, w).clamp(min=1e-12)

    def soft() -> torch.Tensor:
        return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0, 1)

    for it in range(iters):
        beta = 20 - (20 - 2) * it / max(1, iters - 1)
        hv = soft()
        wq = torch.clamp(floor + hv, quantizer.qmin, quantizer.qmax) * scale
        d = w - wq
        rec = torch.einsum("oi,ij,oj->", d, h, d) / norm
        warm = it < iters // 5
        regl = 0.0 if warm else reg * (1 - (2 * hv - 1).abs().pow(beta)).mean()
        loss = rec + regl
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = (soft() >= 0.5).float()
        return (torch.clamp(floor + hard, quantizer.qmin, quantizer.qmax) * scale).to(weight.dtype)


def quantized_input(m: QuantLinear | QuantConv2d, x: torch.Tensor) -> torch.Tensor:
    """What a layer's weight multiplies: a QuantLinear's input after its input transform and quantizer; a
    QuantConv2d's quantized input unfolded into patches [batch, positions, in * kh * kw] (im2col, channel
    major like ``weight.reshape(out, -1)``), so that X^T X is the convolution's GPTQ Hessian."""
    if isinstance(m, QuantConv2d):
        if m.input_quantizer is not None:
            x = m.input_quantizer(x)
        c = m.conv
        return F.unfold(x, c.kernel_size, dilation=c.dilation, padding=c.padding, stride=c.stride).transpose(1, 2)
    x = m.prepare_input(x)
    if m.input_quantizer is not None:
        x = m.input_quantizer(x)
    return x


def _reconstructable(m: torch.nn.Module) -> bool:
    """QuantLinear layers, and ungrouped zero-padded QuantConv2d layers (im2col), with a calibrated weight."""
    if isinstance(m, QuantConv2d):
        c = m.conv
        ok = c.groups == 1 and c.padding_mode == "zeros" and not isinstance(c.padding, str)
    else:
        ok = isinstance(m, QuantLinear)
    return ok and m.weight_quantizer is not None and m.weight_quantizer.calibrated


def _matrix(m: torch.nn.Module) -> torch.Tensor:
    """The weight as GPTQ sees it: [out, in] (a convolution's flattened to [out, in * kh * kw])."""
    w = m.weight.detach()
    return w.reshape(w.shape[0], -1)


def _collect(
    model: torch.nn.Module, names: Sequence[str], batches: list, stop_after: str | None = None
) -> list:
    """H = X^T X / n of each named QuantLinear's quantized inputs (one probe pass, cut after ``stop_after``);
    all zeros for a layer the batches never reach."""
    stats = probes.collect(model, batches, names, {"xtx"}, transform=quantized_input, stop_after=stop_after)
    out = []
    for n in names:
        st = stats[n]
        if st.xtx is None:
            size = _matrix(model.get_submodule(n)).shape[1]
            out.append(torch.zeros(size, size, dtype=torch.float64))
        else:  # X^T X becomes H in place (a copy per layer would hold the stage's statistics twice)
            out.append(st.xtx.div_(max(1, st.rows)))
            st.xtx = None
    return out


@torch.no_grad()
def _set_weight(m: QuantLinear | QuantConv2d, wq: torch.Tensor) -> None:
    m.weight.copy_(wq.reshape(m.weight.shape))


def _quadratic(a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``tr(A H A^T)`` for A [out, in] and H [in, in], in float64 with one [out, in] temporary (an einsum over
    the three formed more and larger ones, at GPTQ's peak)."""
    a = a.double()
    return (a @ h).mul_(a).sum()


def _held(wq: torch.Tensor, q: Any, on_grid: bool) -> Any:
    """A quantized weight waiting for the last stage, as int8 codes and its row scales where GPTQ put it on the
    quantizer's symmetric per-row grid (a quarter of the float bytes), else as it is."""
    if not (on_grid and getattr(q, "symmetric", False) and q.qmin >= -128 and q.qmax <= 127):
        return wq
    scale = _row_scale(q, wq.shape[0])
    codes = torch.round(wq.double() / scale)
    if not torch.equal((codes * scale).to(wq.dtype), wq):  # not on the grid after all: keep the float weight
        return wq
    return codes.to(torch.int8), scale, wq.dtype


def _release(held: Any) -> torch.Tensor:
    if isinstance(held, torch.Tensor):
        return held
    codes, scale, dtype = held
    return (codes.double() * scale).to(dtype)  # the same double product GPTQ formed: the same weights


def reconstruct(
    model: torch.nn.Module,
    batches: Iterable[Any],
    method: str = "gptq",
    granularity: str = "layer",
    blocks: Sequence[str] | None = None,
    reporter: Any = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Reconstruct the quantized weights of every QuantLinear and ungrouped QuantConv2d with a weight quantizer.

    method: "gptq" or "adaround"; granularity: "layer" or "block" (``blocks``: module paths in execution
    order, e.g. ``ModelGraph.blocks()`` paths; layers outside every block are done in a final layer-wise
    step). Returns the relative output error tr(D H D^T)/tr(W H W^T) per layer after reconstruction.

    Statistics are collected one stage (block) at a time either way, so only one block's Hessians are held
    (BERT-base: 100 MB instead of 1.2 GB for all 72 layers at once). Layer granularity stays the one-pass
    algorithm: every Hessian sees the float model, so its quantized weights are written only after the last
    stage (held in the weights' dtype meanwhile) and the result equals collecting all layers in one pass.
    """
    if method not in ("gptq", "adaround"):
        raise ValueError("method must be gptq or adaround")
    if granularity not in ("layer", "block"):
        raise ValueError("granularity must be layer or block")
    batches = list(batches)
    layers = {n: m for n, m in model.named_modules() if _reconstructable(m)}
    fn = gptq_weight if method == "gptq" else adaround_weight
    # during collection weights are float except where already reconstructed
    for m in layers.values():
        m.weight_quantizer.enabled = False
    sequential = granularity == "block"
    stages = block_stages(list(layers), blocks)
    errors: dict[str, float] = {}
    pending: dict[str, torch.Tensor] = {}  # layer granularity: quantized weights written after the last stage
    it = stages if reporter is None else reporter.track(stages, f"{method} reconstruction", total=len(stages))
    try:
        for names, stop_at in it:
            hs = _collect(model, names, batches, stop_after=stop_at)
            for i, n in enumerate(names):
                m, h = layers[n], hs[i]
                w0 = _matrix(m).clone()
                wq = fn(w0, h, m.weight_quantizer, **kwargs)
                if sequential:
                    _set_weight(m, wq)
                    m.weight_quantizer.enabled = True
                else:
                    pending[n] = _held(wq.to(m.weight.dtype), m.weight_quantizer, fn is gptq_weight)
                num = _quadratic(w0.double() - wq, h)
                errors[n] = float(num / _quadratic(w0, h).clamp(min=1e-30))
                hs[i] = h = None  # this layer's Hessian is done with
                del w0, wq
            del hs
            release_freed_memory()  # the stage's Hessians and activations, freed: not stacked under the next stage
        for n, held in pending.items():
            _set_weight(layers[n], _release(held))
        errors = {n: errors[n] for n in layers if n in errors}  # forward order, as one stage gave it
    finally:
        for m in layers.values():
            m.weight_quantizer.enabled = True
    return errors


def rtn_errors(model: torch.nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Relative output error of plain round-to-nearest weights (the baseline reconstruction improves on)."""
    layers = {n: m for n, m in model.named_modules() if _reconstructable(m)}
    hs = _collect(model, list(layers), list(batches))
    out = {}
    for (n, m), h in zip(layers.items(), hs, strict=True):
        w = _matrix(m).double()
        d = w - m.weight_quantizer.fake_quant(_matrix(m)).double()
        out[n] = float(_quadratic(d, h) / _quadratic(w, h).clamp(min=1e-30))
    return out


__all__ = ["adaround_weight", "forward_all", "gptq_weight", "reconstruct", "rtn_errors"]
