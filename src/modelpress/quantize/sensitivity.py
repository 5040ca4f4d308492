"""Sensitivity scan for automatic mixed precision: which layers cost the most quality when quantized.

On a quantized model, each *unit* (a layer with its weight and input quantizers; layers that share one
input quantizer, like q/k/v after scale reparameterization, form one unit; each attention matmul is a
unit) is switched back to float in turn, and the gain in output fidelity against the float model is
measured on a few batches. ``choose_float_units`` then keeps in float the most costly units, greedily,
until a fidelity target is met or a maximum count is reached (the user's bound).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelpress.graph.run import call_module, primary_output
from modelpress.quantize.fakequant import QuantMatMul, quant_layers


@dataclass
class Unit:
    names: list[str]
    quantizers: list[nn.Module]

    @property
    def name(self) -> str:
        return "+".join(self.names)


def quant_units(model: nn.Module) -> list[Unit]:
    units: list[Unit] = []
    by_input: dict[int, Unit] = {}
    for name, m in quant_layers(model):
        if isinstance(m, QuantMatMul):
            qs = [q for q in (m.a_quantizer, m.b_quantizer) if q is not None]
            units.append(Unit([name], qs))
            continue
        qs = [q for q in (m.weight_quantizer,) if q is not None]
        inq = m.input_quantizer
        if inq is not None and id(inq) in by_input:
            u = by_input[id(inq)]
            u.names.append(name)
            u.quantizers += qs
            continue
        u = Unit([name], qs + ([inq] if inq is not None else []))
        if inq is not None:
            by_input[id(inq)] = u
        units.append(u)
    return units


def cosine_fidelity(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean cosine similarity between per-sample flattened outputs."""
    r, o = ref.reshape(ref.shape[0], -1).double(), out.reshape(out.shape[0], -1).double()
    return float(torch.nn.functional.cosine_similarity(r, o, dim=-1).mean())


def model_outputs(model: nn.Module, batches: Sequence[Any]) -> list[torch.Tensor]:
    """The primary output of ``model`` on each batch (no grad)."""
    with torch.no_grad():
        return [primary_output(call_module(model, b)).detach() for b in batches]


def mean_fidelity(
    ref: list[torch.Tensor], out: list[torch.Tensor], metric: Callable = cosine_fidelity
) -> float:
    """``metric`` averaged over the batches."""
    return sum(metric(r, o) for r, o in zip(ref, out, strict=True)) / len(ref)


def _set(unit: Unit, enabled: bool) -> None:
    for q in unit.quantizers:
        q.enabled = enabled


def sensitivity_scan(
    model: nn.Module,
    float_model: nn.Module,
    batches: Iterable[Any],
    metric: Callable[[torch.Tensor, torch.Tensor], float] = cosine_fidelity,
    reporter: Any = None,
) -> tuple[float, list[tuple[Unit, float]]]:
    """(fidelity of the fully quantized model, [(unit, fidelity with that unit in float)]), most costly first."""
    batches = list(batches)
    ref = model_outputs(float_model, batches)
    base = mean_fidelity(ref, model_outputs(model, batches), metric)
    units = quant_units(model)
    it = units if reporter is None else reporter.track(units, "sensitivity scan", total=len(units))
    scores = []
    for u in it:
        _set(u, False)
        try:
            scores.append((u, mean_fidelity(ref, model_outputs(model, batches), metric)))
        finally:
            _set(u, True)
    scores.sort(key=lambda t: -t[1])
    return base, scores


def choose_float_units(
    model: nn.Module,
    float_model: nn.Module,
    batches: Iterable[Any],
    max_float: int = 2,
    target: float | None = None,
    metric: Callable[[torch.Tensor, torch.Tensor], float] = cosine_fidelity,
    reporter: Any = None,
) -> dict[str, Any]:
    """Keep in float (quantizers disabled) up to ``max_float`` units, most costly first, stopping once the
    fidelity reaches ``target`` (when given). Returns the scan and the choice."""
    batches = list(batches)
    base, scores = sensitivity_scan(model, float_model, batches, metric, reporter)
    chosen: list[Unit] = []
    current = base
    ref = model_outputs(float_model, batches)
    for u, _ in scores:
        if len(chosen) >= max_float or (target is not None and current >= target):
            break
        _set(u, False)
        current = mean_fidelity(ref, model_outputs(model, batches), metric)
        chosen.append(u)
    return {
        "fidelity_all_quantized": base,
        "fidelity_after": current,
        "kept_float": [n for u in chosen for n in u.names],
        "scan": [{"unit": u.name, "fidelity_if_float": s} for u, s in scores],
    }
