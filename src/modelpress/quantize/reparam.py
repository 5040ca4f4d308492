"""Scale reparameterization of post-LayerNorm activations (RepQ-ViT, RepQuant).

Calibration quantizes a norm's output per channel (scale s, zero point z, one per channel), which fits
its strong inter-channel variation; inference wants one scale per tensor. With

    s~ = mean(s),  z~ = round(mean(z)),  r1 = s / s~,  r2 = z - z~  (an integer vector)

the per-tensor codes of x' = (x + s * r2) / r1 equal the per-channel codes of x:

    round(x'_c / s~) + z~ = round(x_c / s_c + r2_c) + z~ = round(x_c / s_c) + z_c,

and the consumers undo the transform exactly: W' = W diag(r1), b' = b - W (s * r2).
x' is produced for free by the norm's affine: gamma' = gamma / r1, beta' = (beta + s * r2) / r1 ("fold").
Where the norm's output is also read elsewhere (the residual stream of post-norm BERT, a model output),
folding would change those readers, so the transform stays on the consumer side as one per-channel
multiply-add shared by the consumers ("affine"); ``mode="auto"`` tries the fold and checks it. Groups
without a norm (Linear-input sites, channel_sites.py) are always consumer-side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.graph.run import call_module, primary_output
from modelpress.quantize.fakequant import QuantLinear, set_quant_state
from modelpress.quantize.quantizers import UniformQuantizer


@dataclass
class NormGroup:
    """A norm and the Linear layers that read its output, sharing one input quantizer."""

    norm_name: str
    norm: nn.Module
    consumers: list[tuple[str, QuantLinear]]
    quantizer: UniformQuantizer
    other_readers: bool | None = None  # the norm's output is read by more than the consumers (None: unknown)
    mode: str | None = None  # "fold" or "affine" once reparameterized
    foldable: bool = True  # False for Linear-input sites (channel_sites.py): no norm to fold into
    stats: dict[str, Any] = field(default_factory=dict)


def _norm_has_affine(norm: nn.Module) -> bool:
    return getattr(norm, "weight", None) is not None and getattr(norm, "bias", None) is not None


def merge_uses(pairs: Sequence[tuple]) -> tuple[list[tuple], dict[str, str]]:
    """One (norm, consumers, other_readers) entry per norm, and the norms refused reparameterization.

    A module shared by several blocks (ALBERT's one set of layer weights) is reported once per use. Its
    uses merge into one entry (other readers if any use has them) when every use has the same consumers;
    when the consumer sets differ (e.g. the last use feeds only the model output), one reparameterization
    cannot be exact for every use, so the norm is refused (its consumers keep their per-tensor input
    quantizers) and the reason is returned as {norm: reason}. A consumer already claimed by another norm
    is refused the same way (one Linear has one input quantizer)."""
    by_norm: dict[Any, list[tuple]] = {}
    for pair in pairs:
        key = pair[0] if isinstance(pair[0], str) else id(pair[0])
        by_norm.setdefault(key, []).append(pair)
    merged: list[tuple] = []
    refused: dict[str, str] = {}
    claimed: dict[Any, str] = {}
    for key, uses in by_norm.items():
        name = key if isinstance(key, str) else "?"
        sets = [frozenset(c if isinstance(c, str) else id(c) for c in u[1]) for u in uses]
        if len(set(sets)) > 1:
            refused[name] = (f"shared by {len(uses)} uses with different consumers; "
                             "its consumers keep per-tensor input scales")
            continue
        if not sets[0]:
            continue
        taken = [claimed[c] for c in sets[0] if c in claimed]
        if taken:
            refused[name] = f"its consumers also read {taken[0]}; they keep that norm's input scales"
            continue
        claimed.update({c: name for c in sets[0]})
        readers = [u[2] for u in uses if len(u) > 2 and u[2] is not None]
        other = any(readers) if readers else None
        if len(uses) > 1 and other is None:
            other = True  # a norm run more than once: never fold without knowing every use
        merged.append((uses[0][0], list(uses[0][1]), other, len(uses) > 1))
    return merged, refused


def build_groups(model: nn.Module, pairs: Sequence[tuple], *, mixed: str = "error",
                 refused: dict[str, str] | None = None) -> list[NormGroup]:
    """Resolve (norm, consumers[, other_readers]) tuples, by module name or module, into NormGroups.

    ``other_readers`` (as ``ModelGraph.norm_consumers()`` reports it) says whether anything besides the
    consumer Linears reads the norm's output; unknown when absent. A norm listed once per use (a module
    shared by several blocks) gets one group; see ``merge_uses`` for norms that cannot (skipped here).

    The consumers must be QuantLinear wrappers with input quantizers of one bit width; they are given one
    shared per-channel (axis -1) quantizer, asymmetric unless the consumers' quantizers are symmetric. Pairs whose consumers are float are skipped.
    Consumers partly float or of different activation bits are an error, or with ``mixed="skip"`` that norm
    is left alone (its consumers keep their own per-tensor input quantizers) and the reason goes into
    ``refused``: a search whose precision genes are per Linear gets reparameterization wherever a norm's
    readers agree.
    """
    names = {id(m): n for n, m in model.named_modules()}
    groups = []
    merged, _ = merge_uses(pairs)
    for pair in merged:
        norm_ref, cons_refs = pair[0], pair[1]
        other = bool(pair[2]) if len(pair) > 2 and pair[2] is not None else None
        shared_uses = len(pair) > 3 and bool(pair[3])
        norm = model.get_submodule(norm_ref) if isinstance(norm_ref, str) else norm_ref
        norm_name = norm_ref if isinstance(norm_ref, str) else names.get(id(norm), "?")
        consumers = []
        for c in cons_refs:
            mod = model.get_submodule(c) if isinstance(c, str) else c
            cname = c if isinstance(c, str) else names.get(id(mod), "?")
            consumers.append((cname, mod))
        quantized = [
            (n, m) for n, m in consumers if isinstance(m, QuantLinear) and m.input_quantizer is not None
        ]
        if not quantized:
            continue
        bits = {m.input_quantizer.bits for _, m in quantized}
        problem = None
        if len(quantized) != len(consumers):
            problem = f"the consumers of {norm_name} are partly float ({[n for n, m in consumers if (n, m) not in quantized]})"
        elif len(bits) != 1:
            problem = f"the consumers of {norm_name} use different activation bits {sorted(bits)}"
        if problem is not None:
            if mixed != "skip":
                raise ModelpressError(problem, "give all consumers of one norm the same activation precision in the policy")
            if refused is not None:
                refused[norm_name] = problem + "; they keep per-tensor input scales"
            continue
        symmetric = all(m.input_quantizer.symmetric for _, m in quantized)
        shared = UniformQuantizer(bits.pop(), symmetric=symmetric, axis=-1)
        for _, m in quantized:
            m.input_quantizer = shared
        group = NormGroup(norm_name, norm, quantized, shared, other_readers=other)
        if shared_uses:
            # consumer-side transform: exact for every use, whatever else feeds the shared consumers
            group.foldable = False
            group.stats["uses"] = sum(1 for p in pairs if p[0] is norm_ref or p[0] == norm_ref)
        groups.append(group)
    return groups


def snapshot_group(group: NormGroup) -> dict[str, torch.Tensor | None]:
    """Copies of the norm affine and consumer weights/biases that ``apply_group`` changes."""
    snap: dict[str, torch.Tensor | None] = {}
    if _norm_has_affine(group.norm):
        snap["norm.weight"] = group.norm.weight.detach().clone()
        snap["norm.bias"] = group.norm.bias.detach().clone()
    for n, m in group.consumers:
        snap[f"{n}.weight"] = m.weight.detach().clone()
        snap[f"{n}.bias"] = None if m.bias is None else m.bias.detach().clone()
    return snap


@torch.no_grad()
def restore_group(group: NormGroup, snap: dict[str, torch.Tensor | None]) -> None:
    """Undo ``apply_group`` on the tensors (the quantizer is the caller's to restore)."""
    if "norm.weight" in snap:
        group.norm.weight.copy_(snap["norm.weight"])
        group.norm.bias.copy_(snap["norm.bias"])
    for n, m in group.consumers:
        m.weight.copy_(snap[f"{n}.weight"])
        if snap[f"{n}.bias"] is None:
            m.bias = None
        else:
            m.bias.data = snap[f"{n}.bias"].clone()
        m.input_scale = None
        m.input_shift = None


def reparam_factors(q: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s~, z~, r1, r2) for a calibrated per-channel quantizer."""
    if q.axis is None or q.scale.dim() == 0:
        raise ValueError("scale reparameterization needs a per-channel calibrated quantizer")
    s, z = q.scale.double(), q.zero_point.double()
    s_t = s.mean()
    z_t = torch.round(z.mean())
    return s_t, z_t, s / s_t, z - z_t


@torch.no_grad()
def apply_group(group: NormGroup, mode: str) -> None:
    """Reparameterize one group in place: ``mode`` "fold" (into the norm) or "affine" (consumer side)."""
    q = group.quantizer
    s_t, z_t, r1, r2 = reparam_factors(q)
    s = q.scale.double()
    shift = s * r2  # in the activation's units
    for _, m in group.consumers:
        w = m.weight.double()
        correction = w @ shift
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))
        m.bias.copy_((m.bias.double() - correction).to(m.bias.dtype))
        m.weight.copy_((w * r1).to(m.weight.dtype))
    if mode == "fold":
        norm = group.norm
        norm.bias.copy_(((norm.bias.double() + shift) / r1).to(norm.bias.dtype))
        norm.weight.copy_((norm.weight.double() / r1).to(norm.weight.dtype))
    else:
        dev, dt = group.consumers[0][1].weight.device, group.consumers[0][1].weight.dtype
        scale = (1.0 / r1).to(dev, dt)
        off = (shift / r1).to(dev, dt)
        for _, m in group.consumers:  # shared tensors: one multiply-add in the exported graph
            m.input_scale = scale
            m.input_shift = off
    if mode == "affine":
        q.channel_scale = q.scale.detach().clone()
        q.channel_zero = q.zero_point.detach().clone()
    q.to_per_tensor(s_t.float(), z_t.float())
    group.mode = mode
    group.stats.update({
        "scale_ratio_min": float(r1.min()),
        "scale_ratio_max": float(r1.max()),
        "zero_shift_absmax": float(r2.abs().max()),
        "mode": mode,
    })


@torch.no_grad()
def reparameterize(
    model: nn.Module,
    groups: Sequence[NormGroup],
    check_batch: Any = None,
    mode: str = "auto",
    tolerance: float = 1e-4,
) -> list[NormGroup]:
    """Turn each group's per-channel input quantizer into a per-tensor one, exactly (see module doc).

    mode: "fold" (into the norm's gamma/beta), "affine" (a multiply-add before the consumers' shared
    quantizer) or "auto" (fold where the norm has an affine and ``check_batch`` shows that folding leaves
    the float model's output unchanged, i.e. nothing but the consumers reads the norm; else affine).
    Weight quantizers must be re-calibrated afterwards (the weights changed).
    """
    if mode not in ("auto", "fold", "affine"):
        raise ValueError("mode must be auto, fold or affine")
    reference = None
    if mode == "auto" and check_batch is not None:
        set_quant_state(model, weights=False, activations=False)
        reference = primary_output(call_module(model, check_batch)).double()
    try:
        for g in groups:
            want = mode if g.foldable else "affine"
            if want in ("auto", "fold") and not _norm_has_affine(g.norm):
                if want == "fold":
                    raise ModelpressError(f"{g.norm_name} has no affine weight and bias to fold into")
                want = "affine"
            if want == "auto" and g.other_readers is not None:
                want = "affine" if g.other_readers else "fold"
            if want != "auto":
                apply_group(g, want)
                continue
            snap = snapshot_group(g)
            saved = (g.quantizer.scale.clone(), g.quantizer.zero_point.clone())
            apply_group(g, "fold")
            if reference is None:
                continue
            out = primary_output(call_module(model, check_batch)).double()
            err = (out - reference).abs().max() / reference.abs().max().clamp(min=1e-12)
            if err > tolerance:
                restore_group(g, snap)
                g.quantizer.axis = -1
                g.quantizer.channel_scale = g.quantizer.channel_zero = None
                g.quantizer.set_params(*saved)
                apply_group(g, "affine")
            g.stats["fold_check_error"] = float(err)
    finally:
        if reference is not None:
            set_quant_state(model, weights=True, activations=True)
    return list(groups)


def rebind(groups: Sequence[NormGroup], model: nn.Module) -> list[NormGroup]:
    """The same groups, looked up by name in ``model`` (e.g. a deep copy)."""
    out = []
    for g in groups:
        consumers = [(n, model.get_submodule(n)) for n, _ in g.consumers]
        out.append(
            NormGroup(
                g.norm_name,
                model.get_submodule(g.norm_name),
                consumers,
                consumers[0][1].input_quantizer,
                other_readers=g.other_readers,
                foldable=g.foldable,
            )
        )
    return out
