"""The RepQ-ViT / RepQuant post-training quantization pipeline on a torch model.

1. wrap the quantizable layers by the mixed-precision policy (fake-quant modules, explicit scales);
2. calibrate: post-norm activations (the inputs of each norm's consumer Linears) per channel, every
   other activation per tensor;
3. optionally learn per-channel dual clipping of the post-norm activations (RepQuant);
4. reparameterize the per-channel scales to one per tensor (exact; folded into the norm where nothing
   else reads it, a shared multiply-add before the consumers otherwise);
5. re-calibrate the weight quantizers on the folded weights, optionally reconstruct the quantized
   weights (GPTQ or AdaRound, per layer or per block);
6. reparameterize log-sqrt2 attention probabilities to log2 for inference;
   2b. optionally give more Linear inputs per-channel scales (named, or chosen by a fidelity scan on the
   calibration data), reparameterized on the consumer side like post-norm BERT (channel_sites.py);
7. optionally keep in float the few units the sensitivity scan finds most costly (automatic mixed
   precision, bounded by the user).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from modelpress.quantize.fakequant import (
    QuantConfig,
    activation_quantizers,
    calibrate,
    calibrate_weights,
    wrap_model,
)
from modelpress.quantize.policy import Policy
from modelpress.quantize.reparam import NormGroup, build_groups, merge_uses, reparameterize


@dataclass
class RepQConfig:
    default: Any = "w8a8"
    policy: dict[str, Any] = field(default_factory=dict)
    act_observer: str = "mse"
    norm_observer: str = "minmax"
    weight_observer: str = "auto"  # auto: minmax under GPTQ/AdaRound (measured better), else mse
    attention: bool = False
    probs: str = "logsqrt2"
    reparam: bool = True
    reparam_mode: str = "auto"
    mixed_norm_readers: str = "error"  # error | skip: see reparam.build_groups
    dual_clipping: bool = False
    clipping_steps: int = 200
    reconstruction: str = "none"  # none | gptq | adaround
    granularity: str = "block"  # block (GPTQ's sequential order) | layer: see RepQPassConfig
    log2_inference: bool = True
    weight_reduce_range: bool = False
    symmetric_activations: bool = False
    auto_float: int = 0
    auto_float_target: float | None = None
    observer_samples: int = 1 << 20
    channel_sites: list[str] = field(default_factory=list)
    auto_channel: int = 0
    channel_floor: float = 0.25
    channel_min_gain: float = 0.1
    norm_floor: float | str = "auto"


# Floor on post-norm per-channel scales (fraction of the per-tensor scale) by the consumers' weight bits.
# Reparameterization multiplies weight columns by r1 = s / mean(s): at 4-bit weights that spread costs more
# than the per-channel activation scales gain. Measured on MiniLM (W4A8, GPTQ, fidelity mean): floor 0
# 0.926, 0.1 0.938, 0.25 0.960, 0.5 0.963 (worse minimum); at W6A6 and W8A8 any floor lowered fidelity.
AUTO_NORM_FLOOR = {4: 0.25, 5: 0.1}


def norm_floor(group: NormGroup, setting: float | str) -> float:
    """The scale floor for one norm group: the setting, or by its consumers' weight bits when "auto"."""
    if setting != "auto":
        return float(setting)
    bits = [m.weight_quantizer.bits for _, m in group.consumers if m.weight_quantizer is not None]
    if not bits:
        return 0.0
    return AUTO_NORM_FLOOR.get(min(bits), 0.25 if min(bits) < 4 else 0.0)


@dataclass
class RepQResult:
    model: nn.Module
    groups: list[NormGroup]
    metrics: dict[str, Any]


def quantize_model(
    model: nn.Module,
    batches: Sequence[Any],
    pairs: Sequence[tuple] = (),
    config: RepQConfig | None = None,
    blocks: Sequence[str] | None = None,
    reporter: Any = None,
    float_model: nn.Module | None = None,
) -> RepQResult:
    """Quantize ``model`` in place. ``pairs``: (norm, consumer Linears[, other readers]) from the model
    graph; ``blocks``: block paths in execution order (reconstruction's stages: block-wise reconstruction, and
    at layer granularity one block's statistics held at a time)."""
    cfg = config or RepQConfig()
    batches = list(batches)
    if not batches:
        raise ValueError("quantization needs calibration batches")
    log = (lambda msg: reporter.log(msg)) if reporter is not None else (lambda msg: None)
    if float_model is None and cfg.auto_float > 0:
        float_model = copy.deepcopy(model)
    metrics: dict[str, Any] = {"config": asdict(cfg)}

    weight_observer = cfg.weight_observer
    if weight_observer == "auto":
        weight_observer = "minmax" if cfg.reconstruction != "none" else "mse"
    policy = Policy(cfg.policy, default=cfg.default)
    qcfg = QuantConfig(
        weight_observer=weight_observer,
        act_observer=cfg.act_observer,
        attention=cfg.attention,
        probs=cfg.probs,
        weight_reduce_range=cfg.weight_reduce_range,
        symmetric_activations=cfg.symmetric_activations,
    )
    applied = wrap_model(model, policy, qcfg)
    metrics["layers"] = {n: str(s) for n, s in applied.items()}
    unmatched = policy.unmatched(list(applied))
    if unmatched:
        metrics["unmatched_policy_patterns"] = unmatched
        log(f"policy patterns that match no quantizable layer: {', '.join(unmatched)}")
    _, refused = merge_uses(pairs)
    groups = (build_groups(model, pairs, mixed=cfg.mixed_norm_readers, refused=refused)
              if (cfg.reparam or cfg.dual_clipping) else [])
    if refused and (cfg.reparam or cfg.dual_clipping):
        metrics["reparam_refused"] = refused
        for norm, reason in refused.items():
            log(f"no scale reparameterization at {norm}: {reason}")
    group_qs = [g.quantizer for g in groups]
    others = [q for _, q in activation_quantizers(model) if all(q is not g for g in group_qs)]
    kw = {"max_samples": cfg.observer_samples}
    if group_qs:
        calibrate(model, batches, reporter, observer=cfg.norm_observer, observer_kwargs=kw, only=group_qs)
        from modelpress.quantize.channel_sites import apply_floor

        for g in groups:
            apply_floor(g.quantizer, norm_floor(g, cfg.norm_floor))
    if others:
        calibrate(model, batches, reporter, observer=cfg.act_observer, observer_kwargs=kw, only=others)
    if cfg.reparam and (cfg.channel_sites or cfg.auto_channel > 0):
        from modelpress.quantize.channel_sites import choose_sites

        sites, metrics["channel_sites"] = choose_sites(
            model,
            batches,
            taken=group_qs,
            patterns=cfg.channel_sites,
            max_auto=cfg.auto_channel,
            min_gain=cfg.channel_min_gain,
            observer=cfg.norm_observer,
            observer_kwargs=kw,
            weight_observer=weight_observer,
            weights_in_scan=cfg.reconstruction == "none",
            floor=cfg.channel_floor,
            reporter=reporter,
        )
        if sites:
            log(f"per-channel input scales (reparameterized) at {', '.join(g.norm_name for g in sites)}")
        unmatched_sites = [
            p for p in cfg.channel_sites
            if not any(n == p or fnmatch.fnmatchcase(n, p) for n in metrics["channel_sites"]["named"])
        ]
        if unmatched_sites:
            metrics["channel_sites"]["unmatched_patterns"] = unmatched_sites
            log(
                f"channel_sites patterns that match no quantized Linear with its own input quantizer: "
                f"{', '.join(unmatched_sites)}"
            )
        groups += sites

    if cfg.dual_clipping and groups:
        from modelpress.quantize.clipping import learn_clipping

        metrics["dual_clipping"] = learn_clipping(
            model, groups, batches, steps=cfg.clipping_steps, reporter=reporter
        )
    if groups and cfg.reparam:
        reparameterize(model, groups, check_batch=batches[0], mode=cfg.reparam_mode)
        metrics["reparam"] = {g.norm_name: g.stats for g in groups}
        log(
            f"scale reparameterization: {sum(g.mode == 'fold' for g in groups)} folded into norms, "
            f"{sum(g.mode == 'affine' for g in groups)} on the consumer side"
        )
    calibrate_weights(model, weight_observer)

    if cfg.reconstruction != "none":
        from modelpress.quantize.reconstruct import reconstruct

        errs = reconstruct(
            model,
            batches,
            method=cfg.reconstruction,
            granularity=cfg.granularity,
            blocks=blocks,
            reporter=reporter,
        )
        metrics["reconstruction_error_mean"] = sum(errs.values()) / max(1, len(errs))
    if cfg.log2_inference:
        from modelpress.quantize.log2 import reparameterize_log_sqrt2

        metrics["log2_matmuls"] = reparameterize_log_sqrt2(model)
    if cfg.auto_float > 0:
        from modelpress.quantize.sensitivity import choose_float_units

        scan_batches = batches[: min(4, len(batches))]
        metrics["auto_float"] = choose_float_units(
            model,
            float_model,
            scan_batches,
            max_float=cfg.auto_float,
            target=cfg.auto_float_target,
            reporter=reporter,
        )
    return RepQResult(model, groups, metrics)
