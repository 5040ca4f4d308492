"""Float fallback for layers whose QDQ export disagrees with their torch fake-quant form.

A QDQ export should compute what the fake-quant torch model computes. Where one layer cannot be lowered
faithfully (an export form that mismatches its torch simulation, e.g. a layout or attribute the lowering
gets wrong), the whole export drifts and the run would end in an error. ``diverging_layers`` finds such
layers: each quantized layer is exported alone, fed the inputs it sees in the model, and compared with
its torch output; ``keep_float`` then switches them to float (weights and inputs unquantized, in torch
and in the export alike), so the retried export matches the model again, at the cost of those layers'
integer kernels. Hybrid conv + attention models are where this matters most: the bridge layers between
convolution and attention stages (NCHW <-> token layouts, see Q-HyViT) are the ones most likely to need it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.graph.run import call_module, eval_mode

# one layer exported alone rounds where its simulation rounds: anything below this is a lowering fault
LAYER_MIN_COSINE = 0.999


@dataclass
class FloatState:
    """What ``keep_float`` removed from one layer (to put it back)."""

    name: str
    module: nn.Module
    quantizers: dict[str, nn.Module | None]


def _quantizer_attrs(module: nn.Module) -> tuple[str, ...]:
    from modelpress.quantize.fakequant import QuantMatMul

    return ("a_quantizer", "b_quantizer") if isinstance(module, QuantMatMul) else ("weight_quantizer", "input_quantizer")


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Wrapped layers that still quantize something (in model order)."""
    from modelpress.quantize.fakequant import quant_layers

    return [
        (name, m) for name, m in quant_layers(model)
        if any(getattr(m, a) is not None for a in _quantizer_attrs(m))
    ]


def keep_float(model: nn.Module, names: Sequence[str]) -> list[FloatState]:
    """Make the layers ``names`` compute in float (their quantizers removed); returns what to restore."""
    out = []
    for name in names:
        m = model.get_submodule(name)
        attrs = _quantizer_attrs(m)
        out.append(FloatState(name, m, {a: getattr(m, a) for a in attrs}))
        for a in attrs:
            setattr(m, a, None)
    return out


def restore(states: Sequence[FloatState]) -> None:
    """Undo ``keep_float``."""
    for s in states:
        for a, q in s.quantizers.items():
            setattr(s.module, a, q)


def _layer_inputs(model: nn.Module, batch: Any, names: Sequence[str]) -> dict[str, tuple[torch.Tensor, ...]]:
    """The positional inputs each of the layers ``names`` receives on ``batch`` (first call)."""
    seen: dict[str, tuple[torch.Tensor, ...]] = {}
    handles = []
    for name in names:
        def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
            if name not in seen and args and all(isinstance(a, torch.Tensor) for a in args):
                seen[name] = tuple(a.detach().clone() for a in args)

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            call_module(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def diverging_layers(
    model: nn.Module,
    batch: Any,
    export: Callable[..., Path],
    check: Callable[..., dict],
    min_cosine: float = LAYER_MIN_COSINE,
) -> list[dict[str, Any]]:
    """Quantized layers whose export, alone, disagrees with their torch fake-quant output.

    ``export(module, example, path, input_names=..., dynamic_axes=...)`` and ``check(path, module,
    [example])`` are the model's own exporter and verifier (``qdq.export_qdq`` with the run's flavour,
    ``qdq.verify_qdq``). Returns ``{"layer", "reason", "cosine"}`` per diverging layer.
    """
    layers = quantized_layers(model)
    inputs = _layer_inputs(model, batch, [n for n, _ in layers])
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, m) in enumerate(layers):
            args = inputs.get(name)
            if args is None:
                continue  # never reached on this batch
            names = ["a", "b"] if len(args) == 2 else ["x"]
            example = dict(zip(names, args, strict=True)) if len(args) == 2 else args[0]
            path = Path(tmp) / f"layer{i}.onnx"
            try:
                export(m, example, path, input_names=names, dynamic_axes={n: {0: "batch"} for n in names})
                cos = float(check(path, m, [example])["min_cosine"])
            except Exception as e:  # noqa: BLE001 - any failure to lower this layer is a reason to keep it float
                found.append({"layer": name, "reason": f"its QDQ export fails: {type(e).__name__}: {e}"[:300],
                              "cosine": None})
                continue
            if cos < min_cosine:
                found.append({"layer": name, "reason": f"its QDQ export disagrees with its torch fake-quant form "
                                                       f"(cosine {cos:.4f} alone)", "cosine": cos})
    return found


def bisect_layers(
    model: nn.Module, ok: Callable[[], bool], names: Sequence[str] | None = None
) -> list[str] | None:
    """The shortest prefix of the quantized layers that, kept float, makes ``ok()`` true (None: even all
    of them float does not); the model is left with that prefix float. For faults that show only in the
    whole graph (no layer fails alone)."""
    names = list(names if names is not None else [n for n, _ in quantized_layers(model)])
    lo, hi = 0, len(names)  # invariant: prefix hi works (checked below), prefix lo does not
    states = keep_float(model, names)
    good = ok()
    restore(states)
    if not good:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        states = keep_float(model, names[:mid])
        good = ok()
        restore(states)
        lo, hi = (lo, mid) if good else (mid, hi)
    keep_float(model, names[:hi])
    return names[:hi]
