"""Weight-only quantization: 4- or 8-bit weights per block of input columns, activations in float.

``quantize_weights(model, batches, config, blocks)`` replaces every Linear (and GPT-2 ``Conv1D``) the policy
quantizes by a packed ``WeightOnlyLinear`` (weight_only_pack.py), block by block in execution order, each
block's statistics collected on the inputs the already-quantized earlier blocks produce (GPTQ's sequential
order; one block's ``X^T X`` held at a time). Methods:

* ``rtn``: round to nearest on each block's [min, max] (symmetric: [-max|w|, max|w|]).
* ``gptq``: ``reconstruct.gptq_weight`` with a fixed grid per block of columns (act-order permutes the columns,
  the grids stay those of the original blocks, so MatMulNBits needs no group index).
* ``awq``: activation-aware scales: layers reading the same input share per-input-channel scales
  ``s = rms(x)^alpha`` (alpha searched on a grid for the least output error ``tr(D H D^T)`` of the quantized
  group); the weights take ``W * s``, the input ``x / s``. The ``1/s`` is folded into the norm that produced
  the input where that is exact (checked: the float model's output does not move), otherwise kept as an input
  Mul (``awq_unfoldable: mul``) or the group is left unscaled (``skip``). ``awq+gptq`` runs GPTQ after.

Embeddings and the LM head stay float unless ``embeddings`` / ``head`` say ``quantize`` (``head_bits``: 4, 8 or
"float" sets the head's form in one option). A tied input embedding
and LM head stay one tensor: kept float together, or quantized once into buffers both modules share: with
``rtn`` / ``awq`` by round to nearest before the first block (every block is then calibrated on the embeddings
inference will see), with ``gptq`` / ``awq+gptq`` by GPTQ in the last stage (the blocks are then calibrated on
the float embeddings): on the head's inputs, each row's Hessian adding what its embedding look-ups cost
(``tied_objective: loss``, :mod:`modelpress.quantize.tied_rows`; ``head`` fits the head's output alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.graph.adapters import is_transposed_linear
from modelpress.quantize.policy import Policy
from modelpress.quantize.tied_rows import RowUse, row_hessians, row_use
from modelpress.quantize.weight_only_pack import (
    WeightOnlyEmbedding,
    WeightOnlyLinear,
    block_params,
    check_layout,
    dequantize,
    quantize_codes,
)

METHODS = ("rtn", "gptq", "awq", "awq+gptq")
# a norm fold counts as exact when the float model's output moves by less than this (relative, max norm)
FOLD_TOLERANCE = 1e-4


@dataclass
class WeightOnlyConfig:
    """How ``quantize_weights`` quantizes (see the module docstring)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    method: str = "rtn"
    act_order: bool = True
    damp: float = 0.01
    awq_grid: int = 20
    awq_unfoldable: str = "mul"
    head: str = "float"
    # the LM head's (and a tied embedding's) form: 4 or 8 bits, or "float"; it overrides ``head`` when given.
    # None: ``head`` decides, at ``bits`` or the policy's
    head_bits: int | str | None = None
    embeddings: str = "float"
    policy: dict[str, Any] = field(default_factory=dict)
    # a tied pair under GPTQ: "loss" adds each row's embedding look-ups to its Hessian (tied_rows.py), "head"
    # fits the head's output alone
    tied_objective: str = "loss"
    seed: int = 0  # the tokens the embedding's Fisher samples


@dataclass
class WeightOnlyResult:
    layers: dict[str, str]  # layer -> "w4 g32 asym" / "float"
    errors: dict[str, float]  # relative output error tr(D H D^T) / tr(W H W^T) (gptq / awq)
    rtn_errors: dict[str, float]  # the same for round to nearest on the same statistics
    awq: dict[str, str]  # layer -> where its activation scales went (a norm, "input Mul", "none")
    tied: dict[str, Any]
    packed_bytes: int
    float_bytes: int


def _weight(m: nn.Module) -> torch.Tensor:
    """[out, in] float weight of a Linear or transposed linear (GPT-2 Conv1D)."""
    w = m.weight.detach()
    return w.t() if is_transposed_linear(m) else w


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _named(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _hf_module(model: nn.Module, getter: str) -> nn.Module | None:
    fn = getattr(model, getter, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


def _rtn(w: torch.Tensor, bits: int, block: int, symmetric: bool) -> tuple[torch.Tensor, ...]:
    scale, zero = block_params(w, bits, block, symmetric)
    return quantize_codes(w, scale, zero, bits, block), scale, zero


def _deq(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, block: int) -> torch.Tensor:
    return dequantize(codes.double(), scale.double(), zero.double(), block)


def _gptq(w: torch.Tensor, h: torch.Tensor, cfg: WeightOnlyConfig, bits: int) -> tuple[torch.Tensor, ...]:
    from modelpress.quantize.reconstruct import gptq_weight

    scale, zero = block_params(w, bits, cfg.block_size, cfg.symmetric)
    s, z = scale.double(), zero.double()
    qmax = 2**bits - 1

    def column(col: torch.Tensor, j: int) -> torch.Tensor:
        g = j // cfg.block_size
        sg, zg = s[:, g : g + 1], z[:, g : g + 1]
        return (torch.clamp(torch.round(col / sg) + zg, 0, qmax) - zg) * sg

    wq = gptq_weight(w.double(), h, None, damp=cfg.damp, act_order=cfg.act_order, column_quant=column)
    return quantize_codes(wq, scale, zero, bits, cfg.block_size), scale, zero


def _rel_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    d = (w.double() - wq.double())
    num = ((d @ h) * d).sum()
    den = ((w.double() @ h) * w.double()).sum().clamp(min=1e-30)
    return float(num / den)


def _awq_scales(ws: list[torch.Tensor], h: torch.Tensor, cfg: WeightOnlyConfig, bits: int) -> torch.Tensor | None:
    """Per-input-channel scales for the layers ``ws`` sharing one input (statistics ``h``); None: none pays."""
    rms = torch.diag(h).clamp(min=0).sqrt()
    if not bool((rms > 0).any()):
        return None
    rms = rms.clamp(min=float(rms.max()) * 1e-4)

    def error(s: torch.Tensor) -> float:
        total = 0.0
        for w in ws:
            codes, scale, zero = _rtn(w.double() * s, bits, cfg.block_size, cfg.symmetric)
            d = w.double() - _deq(codes, scale, zero, cfg.block_size) / s
            total += float(((d @ h) * d).sum())
        return total

    best, best_s = error(torch.ones_like(rms)), None
    for i in range(1, cfg.awq_grid + 1):
        s = rms ** (i / cfg.awq_grid)
        s = s / (s.max() * s.min()).sqrt()
        e = error(s)
        if e < best:
            best, best_s = e, s
    return best_s


def _outputs(model: nn.Module, batch: Any) -> torch.Tensor:
    from modelpress.graph.run import run_primary

    with torch.no_grad():
        return run_primary(model, batch).double()


def _input_groups(model: nn.Module, names: list[str], batch: Any) -> list[tuple[list[str], str | None]]:
    """Layers of ``names`` reading the same input tensor, with the module (if any) whose output it is."""
    from modelpress.graph.run import call_module

    seen_in: dict[str, int] = {}
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # every recorded tensor kept alive, so no id is reused within the pass

    def record_input(n: str, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            alive.append(args[0])
            seen_in.setdefault(n, id(args[0]))

    def record_output(n: str, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            alive.append(out)
            produced.setdefault(id(out), n)

    hooks = []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: record_input(n, a)))
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1 and not list(m.children()):
            hooks.append(m.register_forward_hook(lambda _m, _a, out, n=n: record_output(n, out)))
    try:
        with torch.no_grad():
            call_module(model, batch)
    finally:
        for hk in hooks:
            hk.remove()
    groups: dict[int, list[str]] = {}
    for n in names:
        if n in seen_in:
            groups.setdefault(seen_in[n], []).append(n)
    return [(g, produced.get(key)) for key, g in groups.items()]


def _first_rows(batch: Any, rows: int = 2) -> Any:
    if isinstance(batch, dict):
        return {k: v[:rows] for k, v in batch.items()}
    return batch[:rows]


def _writable(m: nn.Module) -> None:
    """Give ``m``'s own parameters fresh storage before an in-place write: the model may share its weights with
    the original (``ModelGraph.copy(share_weights=True)``), which must not change."""
    for name, p in list(m.named_parameters(recurse=False)):
        setattr(m, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))


@torch.no_grad()
def _try_fold(model: nn.Module, norm: str, layers: dict[str, nn.Module], s: torch.Tensor, batch: Any) -> bool:
    """Fold ``1/s`` into ``norm`` and ``s`` into the layers' input columns; keep it only where exact."""
    nm = model.get_submodule(norm)
    if nm.weight.shape[0] != s.shape[0]:
        return False
    before = _outputs(model, batch)
    for m in (nm, *layers.values()):
        _writable(m)
    saved = {k: v.detach().clone() for k, v in nm.named_parameters(recurse=False)}
    saved_w = {n: m.weight.detach().clone() for n, m in layers.items()}
    sf = s.to(nm.weight.dtype)
    for p in nm.parameters(recurse=False):
        if p.dim() == 1 and p.shape[0] == sf.shape[0]:
            p.div_(sf)
    for m in layers.values():
        if is_transposed_linear(m):
            m.weight.mul_(sf.reshape(-1, 1).to(m.weight.dtype))
        else:
            m.weight.mul_(sf.reshape(1, -1).to(m.weight.dtype))
    after = _outputs(model, batch)
    err = float((after - before).abs().max() / before.abs().max().clamp(min=1e-30))
    if err <= FOLD_TOLERANCE:
        return True
    for k, p in nm.named_parameters(recurse=False):
        p.copy_(saved[k])
    for n, m in layers.items():
        m.weight.copy_(saved_w[n])
    return False


def _embeddings(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]


def _packed_embedding(m: nn.Embedding, bits: int, cfg: WeightOnlyConfig) -> WeightOnlyEmbedding:
    e = WeightOnlyEmbedding(m.num_embeddings, m.embedding_dim, bits, cfg.block_size, cfg.symmetric, m.padding_idx)
    e.set_codes(*_rtn(m.weight.detach(), bits, cfg.block_size, cfg.symmetric))
    return e


def _gptq_rows(w: torch.Tensor, h: torch.Tensor, use: RowUse, cfg: WeightOnlyConfig, bits: int,
               ) -> tuple[torch.Tensor, ...]:
    """GPTQ of a tied pair's rows, each bucket of rows on its own Hessian (:func:`tied_rows.row_hessians`)."""
    out: list[torch.Tensor] = []
    for rows, hb in row_hessians(h, use):
        part = _gptq(w[rows], hb, cfg, bits)
        if not out:
            out = [torch.zeros((w.shape[0], *t.shape[1:]), dtype=t.dtype) for t in part]
        for whole, t in zip(out, part, strict=True):
            whole[rows] = t
    return tuple(out)


def _packed_linear(m: nn.Module, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   cfg: WeightOnlyConfig, input_scale: torch.Tensor | None = None) -> WeightOnlyLinear:
    w = _weight(m)
    out = WeightOnlyLinear(w.shape[1], w.shape[0], bits, cfg.block_size, cfg.symmetric, bias=m.bias is not None)
    out.set_codes(codes, scale, zero)
    if m.bias is not None:
        out.bias = nn.Parameter(m.bias.detach().clone().reshape(-1))
    if input_scale is not None:
        out.input_scale = input_scale.float()
    return out


def quantize_weights(model: nn.Module, batches: list[Any], cfg: WeightOnlyConfig, blocks: list[str] | None = None,
                     reporter: Any = None) -> WeightOnlyResult:
    """Quantize ``model``'s weights in place (see the module docstring); ``blocks``: block paths in execution
    order (``ModelGraph.blocks()``), for the sequential order; ``batches``: calibration batches (unused by
    ``rtn``)."""
    from modelpress.data import probes

    check_layout(cfg.bits, cfg.block_size)
    if cfg.method not in METHODS:
        raise ModelpressError(f"unknown weight-only method {cfg.method!r}", f"use one of {', '.join(METHODS)}")
    for key in ("head", "embeddings"):
        if getattr(cfg, key) not in ("float", "quantize"):
            raise ModelpressError(f"{key}: {getattr(cfg, key)!r} is not a choice", "use float or quantize")
    if cfg.head_bits not in (None, 4, 8, "float"):
        raise ModelpressError(f"head_bits: {cfg.head_bits!r} is not a choice", "use 4, 8 or float")
    head_form = cfg.head if cfg.head_bits is None else ("float" if cfg.head_bits == "float" else "quantize")
    head_bits = cfg.head_bits if isinstance(cfg.head_bits, int) else None
    if cfg.tied_objective not in ("loss", "head"):
        raise ModelpressError(f"tied_objective: {cfg.tied_objective!r} is not a choice", "use loss or head")
    if cfg.awq_unfoldable not in ("mul", "skip"):
        raise ModelpressError(f"awq_unfoldable: {cfg.awq_unfoldable!r} is not a choice", "use mul or skip")
    # a bare number means weight bits here (activations always stay float)
    rules = {k: (f"w{v}" if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in cfg.policy.items()}
    policy = Policy(rules, default=f"w{cfg.bits}")
    head_mod = _hf_module(model, "get_output_embeddings")
    in_emb = _hf_module(model, "get_input_embeddings")
    head = _named(model, head_mod)
    tied = head_mod is not None and in_emb is not None and head_mod.weight is in_emb.weight
    float_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())

    layers: dict[str, str] = {}
    bits_of: dict[str, int] = {}
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) or is_transposed_linear(m)):
            continue
        spec = policy.spec(name)
        if spec.a_bits is not None:
            raise ModelpressError(f"weight-only policy gives {name} activation bits ({spec})",
                                  "weight-only layers take w4, w8 or float")
        if name == head and head_form == "float" or spec.w_bits is None:
            layers[name] = "float"
            continue
        bits = head_bits if name == head and head_bits is not None else spec.w_bits
        check_layout(bits, cfg.block_size)
        bits_of[name] = bits
    tag = f"g{cfg.block_size} {'sym' if cfg.symmetric else 'asym'}"

    # embeddings first (round to nearest; a tied pair under GPTQ waits for the last stage): every block is then
    # calibrated on what inference will embed
    tied_info: dict[str, Any] = {"tied": bool(tied), "head": head}
    # a tied pair quantized with GPTQ is quantized last, by GPTQ on the head's inputs (with tied_objective: loss
    # each row's Hessian also counts its embedding look-ups, tied_rows.py)
    gptq_tied = bool(tied) and cfg.method in ("gptq", "awq+gptq") and bool(batches)
    emb_name = _named(model, in_emb)
    for name, m in _embeddings(model):
        quantize_it = cfg.embeddings == "quantize" or (tied and m is in_emb and head_form == "quantize")
        if tied and m is in_emb and head_form == "float":
            quantize_it = False  # one float tensor for both
        if not quantize_it:
            layers[name] = "float"
            continue
        # the policy may give the table (or, tied, the head) other bits, e.g. {"lm_head": 8}, or keep it float
        ebits = policy.spec(head if tied and m is in_emb else name).w_bits
        if tied and m is in_emb and head_bits is not None:
            ebits = head_bits
        if ebits is None:
            layers[name] = "float"
            continue
        check_layout(ebits, cfg.block_size)
        if tied and m is in_emb and gptq_tied:
            # GPTQ on the head's statistics, in the last stage (below): the one tensor takes the head's codes
            bits_of[head] = ebits
            layers[name] = f"w{ebits} {tag} (one tensor with {head}, GPTQ on the head's inputs)"
            continue
        packed = _packed_embedding(m, ebits, cfg)
        _set_submodule(model, name, packed)
        layers[name] = f"w{ebits} {tag}"
        if tied and m is in_emb:
            lin = WeightOnlyLinear(m.embedding_dim, m.num_embeddings, ebits, cfg.block_size, cfg.symmetric,
                                   bias=head_mod.bias is not None)
            lin.share_from(packed)
            if head_mod.bias is not None:
                lin.bias = nn.Parameter(head_mod.bias.detach().clone())
            _set_submodule(model, head, lin)
            bits_of.pop(head, None)
            layers[head] = f"w{ebits} {tag} (one tensor with {emb_name})"
            tied_info["quantized_once"] = True

    from modelpress.quantize.reconstruct import block_stages

    use = None
    if gptq_tied and cfg.tied_objective == "loss" and bits_of.get(head) is not None:
        # how the pair's rows are used, on the float model before any block is quantized (tied_rows.py)
        use = row_use(model, in_emb, batches, cfg.seed)
        tied_info["objective"] = ("head inputs + embedding look-ups (loss-aware rows)" if use is not None else
                                  "head inputs (the batches give no input_ids / logits for the look-ups)")
        if use is not None:
            tied_info["rows_looked_up"] = int((use.lookups > 0).sum())

    stages = block_stages(list(bits_of), blocks if cfg.method != "rtn" else None)
    errors: dict[str, float] = {}
    rtn_errors: dict[str, float] = {}
    awq: dict[str, str] = {}
    it = stages if reporter is None else reporter.track(stages, f"weight-only {cfg.method}", total=len(stages))
    for names, stop_at in it:
        hs: dict[str, torch.Tensor | None] = dict.fromkeys(names)
        if cfg.method != "rtn":
            stats = probes.collect(model, batches, names, {"xtx"}, stop_after=stop_at)
            hs = {n: (stats[n].hessian() if stats[n].xtx is not None else None) for n in names}
            del stats
            for n in names:  # plain round to nearest on the same statistics: what the methods improve on
                if hs[n] is not None:
                    w0 = _weight(model.get_submodule(n)).double()
                    rtn_errors[n] = _rel_error(w0, _deq(*_rtn(w0, bits_of[n], cfg.block_size, cfg.symmetric),
                                                         cfg.block_size), hs[n])
        scales_of: dict[str, torch.Tensor] = {}
        if cfg.method.startswith("awq") and batches:
            sample = _first_rows(batches[0])
            for group, norm in _input_groups(model, names, sample):
                h = hs[group[0]]
                if h is None or len({bits_of[n] for n in group}) != 1 or (head in group and tied):
                    continue
                s = _awq_scales([_weight(model.get_submodule(n)) for n in group], h, cfg, bits_of[group[0]])
                if s is None:
                    awq.update(dict.fromkeys(group, "none (no scale beat round to nearest)"))
                    continue
                mods = {n: model.get_submodule(n) for n in group}
                if norm is not None and _try_fold(model, norm, mods, s, sample):
                    awq.update(dict.fromkeys(group, f"folded into {norm}"))
                    where = "folded"
                elif cfg.awq_unfoldable == "mul":
                    with torch.no_grad():
                        for m in mods.values():
                            _writable(m)
                            m.weight.mul_((s.reshape(-1, 1) if is_transposed_linear(m) else s.reshape(1, -1))
                                          .to(m.weight.dtype))
                    awq.update(dict.fromkeys(group, "input Mul"))
                    where = "mul"
                else:
                    awq.update(dict.fromkeys(group, "none (no exact fold)"))
                    continue
                for n in group:
                    hs[n] = hs[n] / torch.outer(s, s)  # the statistics of x / s
                    if where == "mul":
                        scales_of[n] = 1.0 / s
        for n in names:
            m = model.get_submodule(n)
            b = bits_of[n]
            w = _weight(m).double()
            h = hs[n]
            if h is not None and cfg.method in ("gptq", "awq+gptq"):
                if use is not None and n == head:
                    codes, scale, zero = _gptq_rows(w, h, use, cfg, b)
                else:
                    codes, scale, zero = _gptq(w, h, cfg, b)
            else:
                codes, scale, zero = _rtn(w, b, cfg.block_size, cfg.symmetric)
            if h is not None:  # after AWQ, w and h are the scaled ones: W' x' = W x, the same output error
                errors[n] = _rel_error(w, _deq(codes, scale, zero, cfg.block_size), h)
            lin = _packed_linear(m, codes, scale, zero, b, cfg, scales_of.get(n))
            _set_submodule(model, n, lin)
            layers[n] = f"w{b} {tag}" + (" + input Mul" if n in scales_of else "")
            if gptq_tied and n == head and emb_name is not None:
                e = WeightOnlyEmbedding(in_emb.num_embeddings, in_emb.embedding_dim, b, cfg.block_size,
                                        cfg.symmetric, in_emb.padding_idx)
                e.share_from(lin)
                _set_submodule(model, emb_name, e)
                layers[n] += f" (one tensor with {emb_name})"
                tied_info["quantized_once"] = True
    packed = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            packed += t.numel() * t.element_size()
    return WeightOnlyResult(layers, errors, rtn_errors, awq, tied_info, packed, float_bytes)
