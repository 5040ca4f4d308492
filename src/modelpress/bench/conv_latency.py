"""The conv part of the latency model: what the channels of each conv group cost, measured and fitted per stage.

A conv group (one channel dimension shared by the convs that write and read it, their norms and residual
adds) is a *stage*. Every Conv/Linear layer touched by a conv group belongs to the stage of the group it
writes (else of the group it reads), and its multiply-accumulates scale with the product of its touched
widths (``c_out x c_in`` for a conv between two groups, ``c`` for a depthwise conv or a classifier that
reads the last group). The model is

    conv_ms(c) = rest + sum over stages g of  theta_g * F_g(c) + phi_g * c_g / C_g

where ``F_g`` is stage g's MAC-weighted sum of its layers' width products, 1 at the measured widths ``C``
(the products keep the interaction of neighbouring groups: halving both sides of a conv quarters it), and
``phi_g`` takes what scales with the channels alone (norms, activations, copies). ``rest``, ``theta`` and
``phi`` are non-negative, so a channel never costs less than nothing and the latency is monotone in every
group's width.

Measured on whole models (CNNs are small; a stage's cost depends on the cache and on its neighbours): the
model as given, every group alone at 1/4 and 1/2 of its channels, and every group at once at 1/2 and 3/4,
all timed interleaved against the model as given (per-round ratios). Groups are read from the graph
(``kind == "conv"``, prunable); a group missing from a graph (its block removed) counts 0 channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from modelpress.graph.model_graph import ModelGraph
from modelpress.graph.stats import output_positions

FRACTIONS = (0.25, 0.5)  # one group at a time
JOINT = (0.5, 0.75)  # every group at once
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_groups(graph: ModelGraph) -> dict[str, int]:
    """Prunable conv groups of ``graph``: name -> channels."""
    return {g.name: int(g.size) for g in graph.groups if g.kind == "conv" and g.prunable}


def conv_widths(graph: ModelGraph) -> dict[str, int]:
    """Every conv group of ``graph`` (prunable or not: a group cut to one channel is fixed): name -> channels."""
    return {g.name: int(g.size) for g in graph.groups if g.kind == "conv"}


def conv_stages(graph: ModelGraph, batch: int = 1) -> dict[str, list[list[Any]]]:
    """Per conv group (stage): its layers as ``[MAC share, [groups whose width ratios multiply]]``.

    MAC shares are the layers' multiply-accumulates at ``batch`` (weight elements x output positions),
    normalized within the stage."""
    groups = conv_groups(graph)
    touched: dict[tuple[str, int], str] = {}
    for g in graph.groups:
        if g.name in groups:
            for param, axis in g.slots:
                if param.endswith(".weight") and axis in (0, 1):
                    touched[(param, axis)] = g.name
    positions = output_positions(graph, batch)
    stages: dict[str, list[list[Any]]] = {name: [] for name in groups}
    for name, mod in graph.module.named_modules():
        if not isinstance(mod, _LAYERS):
            continue
        w = f"{name}.weight"
        out_g, in_g = touched.get((w, 0)), touched.get((w, 1))
        if out_g is None and in_g is None:
            continue
        factors = [g for g in (out_g, in_g) if g is not None]
        macs = float(mod.weight.numel() * max(positions.get(name, 1), 1))
        stages[out_g or in_g].append([macs, factors])
    for layers in stages.values():
        total = sum(m for m, _ in layers) or 1.0
        for layer in layers:
            layer[0] = layer[0] / total
    return stages


def features(stages: Mapping[str, list], full: Mapping[str, int], channels: Mapping[str, float]) -> list[float]:
    """The fit's row for ``channels`` (missing groups: 0): 1, then F_g per stage, then c_g / C_g per stage."""
    ratio = {g: float(channels.get(g, 0)) / full[g] if full[g] else 0.0 for g in full}
    f = [sum(share * float(np.prod([ratio[x] for x in factors])) for share, factors in stages[g]) for g in full]
    return [1.0, *f, *(ratio[g] for g in full)]


def variants(full: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Channel settings to measure: the model as given, each group alone at FRACTIONS, all at JOINT."""
    out: dict[str, dict[str, int]] = {"full": dict(full)}
    seen = {tuple(sorted(full.items()))}

    def add(name: str, setting: dict[str, int]) -> None:
        k = tuple(sorted(setting.items()))
        if k not in seen:
            seen.add(k)
            out[name] = setting

    for i, g in enumerate(full):
        for f in FRACTIONS:
            add(f"g{i}_{f:g}", {**full, g: max(1, round(full[g] * f))})
    for f in JOINT:
        add(f"all_{f:g}", {g: max(1, round(c * f)) for g, c in full.items()})
    return out


def cut(graph: ModelGraph, setting: Mapping[str, int]) -> ModelGraph:
    """A copy of ``graph`` whose conv groups keep their first ``setting[name]`` channels."""
    out = graph.copy()
    sizes = conv_groups(out)
    plan = [(g, list(range(k, sizes[g]))) for g, k in setting.items() if k < sizes[g]]
    if plan:
        out.remove_many(plan)
    return out


def fit(stages: Mapping[str, list], full: Mapping[str, int], settings: Mapping[str, Mapping[str, int]],
        ms: Mapping[str, float]) -> tuple[list[float], float]:
    """Non-negative least squares of the measured ms on the features; the model as given weighs 3x.
    Returns the coefficients (rest, theta per stage, phi per stage) and the fit's relative rms residual."""
    from scipy.optimize import nnls

    names = [n for n in settings if np.isfinite(ms.get(n, np.nan))]
    x = np.asarray([features(stages, full, settings[n]) for n in names])
    y = np.asarray([ms[n] for n in names])
    w = np.asarray([3.0 if n == "full" else 1.0 for n in names])
    coef, _ = nnls(x * w[:, None], y * w)
    pred = x @ coef
    rms = float(np.sqrt(np.mean(((pred - y) / np.maximum(y, 1e-9)) ** 2)))
    return coef.tolist(), rms


def predict_ms(part: Mapping[str, Any], channels: Mapping[str, float]) -> float:
    """The conv part's latency (ms) at ``channels`` (name -> width; missing groups count 0)."""
    return float(np.dot(part["coef"], features(part["stages"], part["groups"], channels)))


def export_variants(graph: ModelGraph, full: Mapping[str, int], tmp: Path, export) -> dict[str, tuple[Path, dict]]:  # noqa: ANN001
    """Export every channel setting of :func:`variants` with ``export(graph, path)``; name -> (file, widths)."""
    files = {}
    for name, setting in variants(full).items():
        g = cut(graph, setting)
        widths = conv_widths(g)
        files[name] = (export(g, tmp / f"conv_{name}.onnx"), {k: widths.get(k, 0) for k in full})
    return files
