"""Per-channel activation scales beyond the norms: RepQ's scale reparameterization at any Linear input.

RepQ-ViT reparameterizes post-LayerNorm activations, whose channels differ widely in range. Other Linear
inputs can be as uneven (in BERT, the GELU output that feeds each MLP's second Linear). There no norm
precedes the Linear, so the per-channel scales are reparameterized on the consumer side only: the Linear
keeps one per-tensor input scale for its integer kernel and takes W diag(r1) as its weight, while the
exported graph quantizes the untransformed input per channel (one per-axis QuantizeLinear, the same
integer codes), so inference costs what the per-tensor version costs.

Which sites: the layers a user names, or chosen automatically on calibration data. Each candidate's
per-tensor input quantizer is swapped for a per-channel one in turn and the change in output fidelity
against the float model is measured on a few batches (with the site's weight reparameterized and
re-quantized, as it would end up); the
candidates that gain the most, each recovering at least ``min_gain`` (a fraction) of the fidelity lost
to activation quantization, are kept, up to the user's bound.

Channels that stay quiet during calibration get tiny per-channel scales and clip hard on inputs where
they fire: ``floor`` keeps every channel's scale at least that fraction of the per-tensor scale.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from modelpress.quantize.fakequant import (
    QuantLinear,
    calibrate,
    calibrate_weights,
    set_quant_state,
)
from modelpress.quantize.observers import calibrate_weight
from modelpress.quantize.quantizers import UniformQuantizer
from modelpress.quantize.reparam import NormGroup, apply_group, restore_group, snapshot_group
from modelpress.quantize.sensitivity import mean_fidelity, model_outputs


def candidates(model: nn.Module, taken: Sequence[UniformQuantizer] = ()) -> list[tuple[str, QuantLinear]]:
    """Quantized Linear layers whose input quantizer is their own, per tensor, and in no norm group."""
    taken_ids = {id(q) for q in taken}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    counts = Counter(id(m.input_quantizer) for _, m in layers if m.input_quantizer is not None)
    out = []
    for n, m in layers:
        q = m.input_quantizer
        if (
            isinstance(q, UniformQuantizer)
            and q.axis is None
            and m.input_scale is None
            and id(q) not in taken_ids
            and counts[id(q)] == 1
        ):
            out.append((n, m))
    return out


@torch.no_grad()
def apply_floor(q: UniformQuantizer, floor: float) -> None:
    """Raise each channel's scale to at least ``floor`` x the scale one per-tensor range would get."""
    if floor <= 0:
        return
    lo = (q.qmin - q.zero_point) * q.scale
    hi = (q.qmax - q.zero_point) * q.scale
    per_tensor = (hi.max() - lo.min()) / float(q.qmax - q.qmin)
    scale = torch.maximum(q.scale, per_tensor * floor)
    if q.symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = torch.clamp(torch.round(q.qmin - lo / scale), q.qmin, q.qmax)
    q.set_params(scale, zero)


def _channel_quantizers(
    layers: Sequence[tuple[str, QuantLinear]],
    model: nn.Module,
    batches: Sequence[Any],
    observer: str,
    observer_kwargs: dict[str, Any],
    floor: float,
    reporter: Any,
) -> dict[str, UniformQuantizer]:
    """Per-channel quantizers for ``layers``, calibrated together in one pass over ``batches``."""
    saved = {n: m.input_quantizer for n, m in layers}
    fresh = {
        n: UniformQuantizer(m.input_quantizer.bits, symmetric=m.input_quantizer.symmetric, axis=-1)
        for n, m in layers
    }
    for n, m in layers:
        m.input_quantizer = fresh[n]
    try:
        calibrate(
            model,
            batches,
            reporter,
            observer=observer,
            observer_kwargs=observer_kwargs,
            only=list(fresh.values()),
        )
    finally:
        for n, m in layers:
            m.input_quantizer = saved[n]
    for q in fresh.values():
        apply_floor(q, floor)
    return fresh


@torch.no_grad()
def _trial(group: NormGroup, weight_observer: str) -> Callable[[], None]:
    """Reparameterize one site and re-quantize its weight (what the site will be); returns an undo."""
    (_, m), q = group.consumers[0], group.quantizer
    snap, params = snapshot_group(group), (q.scale.clone(), q.zero_point.clone())
    before = m.input_quantizer
    m.input_quantizer = q
    apply_group(group, "affine")
    if m.weight_quantizer is not None and m.weight_quantizer.enabled:
        calibrate_weight(m.weight_quantizer, m.weight.detach(), weight_observer)

    def undo() -> None:
        restore_group(group, snap)
        q.axis, q.channel_scale, q.channel_zero = -1, None, None
        q.set_params(*params)
        m.input_quantizer = before
        group.mode, group.stats = None, {}
        if m.weight_quantizer is not None and m.weight_quantizer.enabled:
            calibrate_weight(m.weight_quantizer, m.weight.detach(), weight_observer)

    return undo


def _group(name: str, layer: QuantLinear, quantizer: UniformQuantizer) -> NormGroup:
    return NormGroup(name, layer, [(name, layer)], quantizer, other_readers=True, foldable=False)


def choose_sites(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    taken: Sequence[UniformQuantizer] = (),
    patterns: Sequence[str] = (),
    max_auto: int = 0,
    min_gain: float = 0.1,
    scan_batches: int = 4,
    observer: str = "minmax",
    observer_kwargs: dict[str, Any] | None = None,
    weight_observer: str = "minmax",
    weights_in_scan: bool = True,
    floor: float = 0.25,
    reporter: Any = None,
) -> tuple[list[NormGroup], dict[str, Any]]:
    """Per-channel input sites: the candidate layers matching ``patterns`` plus up to ``max_auto`` more
    chosen by the fidelity scan. Returns consumer-side groups (ready for ``reparameterize``) and a report.
    Call after the per-tensor activation calibration, before the weights are re-calibrated.

    The scan measures each candidate as it would end up: input quantized per channel, weight
    reparameterized (W diag(r1)) and, with ``weights_in_scan``, re-quantized (a per-channel input can lose
    when the reparameterized weight quantizes worse). Pass ``weights_in_scan=False`` when a weight
    reconstruction (GPTQ, AdaRound) follows: it compensates the weight error given the new inputs, and
    measured on MiniLM the plain re-quantized weight misjudges the sites that gain most after it."""
    layers = candidates(model, taken)
    named = [(n, m) for n, m in layers if any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns)]
    report: dict[str, Any] = {"candidates": len(layers), "named": [n for n, _ in named]}
    if not named and max_auto <= 0:
        return [], report
    chosen = [n for n, _ in named]
    rest = [(n, m) for n, m in layers if n not in chosen]
    # The scan judges on batches the trial quantizers did not see: per-channel ranges fit their
    # calibration data more tightly than one per-tensor range, so in-sample scores flatter them.
    held = max(1, min(scan_batches, len(batches) // 4)) if len(batches) > 1 else 0
    fit, scan = (list(batches[:-held]), list(batches[-held:])) if held else (list(batches), list(batches))
    kw = dict(observer_kwargs or {})
    if max_auto > 0 and rest:
        trial = _channel_quantizers(rest, model, fit, observer, kw, floor, reporter)
        groups = {n: _group(n, m, trial[n]) for n, m in rest}
        calibrate_weights(model, weight_observer)
        set_quant_state(model, weights=False, activations=False)
        ref = model_outputs(model, scan)
        set_quant_state(model, weights=weights_in_scan, activations=True)
        base = mean_fidelity(ref, model_outputs(model, scan))
        gains = []
        it = rest if reporter is None else reporter.track(rest, "per-channel site scan", total=len(rest))
        for n, _ in it:
            undo = _trial(groups[n], weight_observer)
            try:
                gains.append((n, mean_fidelity(ref, model_outputs(model, scan)) - base))
            finally:
                undo()
        set_quant_state(model, weights=True, activations=True)
        gains.sort(key=lambda t: -t[1])
        loss = max(1.0 - base, 1e-12)
        picked = [n for n, g in gains if g > 0 and g / loss >= min_gain][:max_auto]
        chosen += picked
        report["scan"] = {
            "held_out_batches": held,
            "fidelity_per_tensor": base,
            "gain_if_per_channel": dict(gains),
        }
        report["auto"] = picked
    modules = dict(layers)
    final = [(n, modules[n]) for n in chosen]
    fresh = _channel_quantizers(final, model, batches, observer, kw, floor, reporter) if final else {}
    groups = {n: _group(n, m, fresh[n]) for n, m in final}
    for n in chosen:
        groups[n].consumers[0][1].input_quantizer = fresh[n]
    report["sites"] = chosen
    report["floor"] = floor
    return [groups[n] for n in chosen], report
