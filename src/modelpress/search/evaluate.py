"""Evaluating candidates: quality on held-out data, latency on the target (measured in ONNX Runtime, or
predicted by the latency model extended to precision), and size.

Precision genes go through the quantize pass found by name in the passes registry (``quantize.repq`` by
default, its per-layer ``policy``), never by importing it; an INT8 candidate scored with the ONNX backend is
the real QDQ INT8 graph the pass's exporter writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import ModelpressError
from modelpress.passes import Context, registered_passes
from modelpress.search.supernet import SuperNet

OBJECTIVES = {"quality": "max", "latency": "min", "size": "min"}
LATENCY_MODES = ("predicted", "measured")
UNITS = {"quality": "", "latency": "ms", "size": "MB"}
QUALITY_METRICS = ("accuracy", "fidelity_mean", "agreement")
PRECISION_SPEC = {"int8": "w8a8", "w4a8": "w4a8"}
BYTES = {"float": 4.0, "int8": 1.0, "w4a8": 0.5}
# RepQ's scale reparameterization wherever a norm's readers share one precision; one gene per Linear can
# split them (q float, k INT8), and such a norm keeps per-tensor input scales ("skip"). MiniLM, full INT8,
# 48 held-out sentences: fidelity 0.9922 without reparameterization, 0.9944 with it, at the same cost.
FAST_REPQ = {"samples": 64, "reconstruction": "none", "act_observer": "minmax", "weight_observer": "minmax",
             "reparam": True, "mixed_norm_readers": "skip"}


def check_objectives(objectives: list[str]) -> list[str]:
    """Validate the user's objectives (at least two, known, no repeats)."""
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise ModelpressError(f"unknown objective {', '.join(map(repr, unknown))}",
                              f"choose from {', '.join(OBJECTIVES)}")
    if len(set(objectives)) != len(objectives) or len(objectives) < 2:
        raise ModelpressError(f"objectives {objectives} must be two or three different ones",
                              "e.g. --objectives quality,latency")
    return list(objectives)


def check_latency_mode(latency: str) -> str:
    """Validate the latency mode: predicted by the latency model, or measured in ONNX Runtime."""
    if latency not in LATENCY_MODES:
        raise ModelpressError(f"unknown latency mode {latency!r}", f"choose {' or '.join(LATENCY_MODES)}")
    return latency


@dataclass
class EvalSettings:
    """How candidates are evaluated (JSON-ready: it goes into the run's spec)."""

    objectives: list[str]
    latency: str = "predicted"  # or "measured"
    quality_backend: str = "torch"  # or "onnx" (needed for measured latency)
    precision_pass: str = "quantize.repq"
    precision_config: dict[str, Any] = field(default_factory=lambda: dict(FAST_REPQ))
    int8_factor: float | None = None  # predicted INT8 block latency / float (measured at the start)
    batch: int = 1  # the latency objective's batch size (a compute-bound batch for small models)
    seq: int | None = None  # its sequence length (text models; None: the target's first)


class Evaluator:
    """Scores sub-network configs of one super-network in one Context."""

    def __init__(self, net: SuperNet, ctx: Context, settings: EvalSettings, latency_model: Any = None) -> None:
        check_objectives(settings.objectives)
        check_latency_mode(settings.latency)
        if settings.latency == "predicted" and "latency" in settings.objectives and latency_model is None:
            raise ModelpressError("predicted latency needs a latency model", "build one, or use measured latency")
        if settings.latency == "measured" and "latency" in settings.objectives:
            settings.quality_backend = "onnx"
        self.net, self.ctx, self.settings, self.latency_model = net, ctx, settings, latency_model
        self._axes = _param_axes(net)

    # ----- cheap, analytic objectives (no model built)
    def param_counts(self, config: dict[str, Any]) -> dict[str, float]:
        """Elements of every parameter of the extracted sub-network, computed from the config alone."""
        kept = {g.name: k for g, k in self.net.cuts(config)}
        skipped = self.net.skipped(config)
        out = {}
        for name, (numel, cuts) in self._axes.items():
            if any(name.startswith(p + ".") for p in skipped):
                continue
            n = float(numel)
            for gname, size in cuts:
                n *= kept.get(gname, size) / size
            out[name] = n
        return out

    def size_mb(self, config: dict[str, Any], counts: dict[str, float] | None = None) -> float:
        counts = self.param_counts(config) if counts is None else counts
        prec = config.get("precision") or {}
        total = 0.0
        for name, n in counts.items():
            layer, _, attr = name.rpartition(".")
            total += n * BYTES[prec.get(layer, "float") if attr == "weight" else "float"]
        return total / 2**20

    def predicted_latency(self, config: dict[str, Any], counts: dict[str, float] | None = None) -> float:
        """Latency model: per kept block its table latency, the INT8 share of its Linear weights scaled by
        the measured INT8/float factor; plus the rest of the model."""
        table = self.latency_model
        if table is None:
            raise ModelpressError("no latency model to predict with")
        counts = self.param_counts(config) if counts is None else counts
        prec = config.get("precision") or {}
        factor = self.settings.int8_factor if self.settings.int8_factor is not None else 1.0
        embed = config.get("embed") or table.architecture["embed"]
        total = table.rest_ms(embed)
        for b, row in zip(self.net.space.blocks, config["blocks"], strict=True):
            if not row.get("keep", True):
                continue
            heads_per_unit = self.net.graph.group(b.head_group).heads_per_unit if b.head_group else 1
            ms = table.block_ms(row.get("heads", 0) * heads_per_unit,
                                row.get("head_dim", table.architecture["head_dim"]), row.get("mlp", 0), embed)
            layers = [n for n in self.net.space.precision_layers if n.startswith(b.path + ".")]
            weights = {n: counts.get(f"{n}.weight", 0.0) for n in layers}
            total_w = sum(weights.values())
            q = sum(w for n, w in weights.items() if prec.get(n, "float") != "float") / total_w if total_w else 0.0
            total += ms * (1.0 - q * (1.0 - factor))
        return total

    def cheap(self, config: dict[str, Any]) -> dict[str, float]:
        """The objectives computable without building the model (size; latency when predicted)."""
        counts = self.param_counts(config)
        out: dict[str, float] = {}
        if "size" in self.settings.objectives:
            out["size"] = self.size_mb(config, counts)
        if "latency" in self.settings.objectives and self.settings.latency == "predicted":
            out["latency"] = self.predicted_latency(config, counts)
        return out

    def cheap_objectives(self) -> list[str]:
        return [o for o in self.settings.objectives if o == "size" or (o == "latency" and self.settings.latency == "predicted")]

    # ----- real evaluation
    def build(self, config: dict[str, Any]) -> tuple[Any, Any]:
        """The extracted sub-network with its precision applied: (graph, exporter or None)."""
        sub = self.net.extract(config)
        prec = {k: v for k, v in (config.get("precision") or {}).items() if v != "float"}
        if not prec:
            return sub, None
        policy = {}
        for name, _ in sub.module.named_modules():
            original = sub.original_path(name)
            if original in prec:
                policy[name] = PRECISION_SPEC[prec[original]]
        if not policy:
            return sub, None
        passes = registered_passes()
        if self.settings.precision_pass not in passes:
            raise ModelpressError(f"no pass {self.settings.precision_pass!r} to apply precision with",
                                  "install modelpress with its quantize plugin")
        cls = passes[self.settings.precision_pass]
        cfg = cls.Config(**{**self.settings.precision_config, "default": "float", "policy": policy})
        result = cls(cfg).apply(sub, self.ctx)
        return result.graph, result.exporter

    def quality(self, config: dict[str, Any], onnx_path: Path | None = None) -> tuple[float, Path | None]:
        graph, exporter = self.build(config)
        if self.settings.quality_backend == "onnx":
            if onnx_path is not None:
                onnx_path.parent.mkdir(parents=True, exist_ok=True)
                self.ctx.export(graph, onnx_path, exporter=exporter)
                ev = self.ctx.evaluate(onnx_path)
            else:
                ev = self.ctx.evaluate(graph, exporter=exporter)
            return pick_quality(ev.metrics), Path(ev.onnx_path)
        return pick_quality(self.ctx.evaluate(graph, torch_only=True).metrics), None

    def evaluate(self, config: dict[str, Any], onnx_path: Path | None = None) -> dict[str, Any]:
        """Every objective of ``config`` that one worker can compute (measured latency comes per batch)."""
        out: dict[str, Any] = {"objectives": self.cheap(config)}
        if "quality" in self.settings.objectives:
            q, path = self.quality(config, onnx_path)
            out["objectives"]["quality"] = q
            out["onnx"] = None if path is None else str(path)
        elif self.settings.latency == "measured":
            graph, exporter = self.build(config)
            path = onnx_path or self.ctx._scratch("model.onnx")
            self.ctx.export(graph, path, exporter=exporter)
            out["onnx"] = str(path)
        return out

    def measure_latency(self, onnx: dict[str, str], baseline: str, baseline_ms: float | None = None,
                        rounds: int = 3) -> dict[str, float]:
        """Latency (ms at the settings' batch and sequence) of ONNX files, timed interleaved with
        ``baseline`` (the full float model): reported as the median per-round ratio times ``baseline_ms``
        (the baseline's reference latency) so that batches measured under different machine load stay
        comparable."""
        files = {"__baseline__": baseline, **onnx}
        b, seq = self.settings.batch, self.settings.seq
        timing: dict[str, Any] = {"seq_lens": [seq]} if seq else {}
        report = self.ctx.measure(files, baseline="__baseline__", rounds=rounds, batch_sizes=[b], memory=False,
                                  min_time_s=0.1, runs=5, **timing)
        base = report.stats("__baseline__", b, seq)
        ref = base.median_ms if baseline_ms is None else baseline_ms
        out = {}
        for name in onnx:
            speed = report.speedup(name, b, seq)
            out[name] = ref / speed if speed else report.stats(name, b, seq).median_ms
        out["__baseline__"] = base.median_ms
        return out


def pick_quality(metrics: dict[str, float]) -> float:
    for k in QUALITY_METRICS:
        if k in metrics:
            return float(metrics[k])
    raise ModelpressError(f"no quality metric among {sorted(metrics)}", f"the task must report one of {QUALITY_METRICS}")


def _param_axes(net: SuperNet) -> dict[str, tuple[int, list[tuple[str, int]]]]:
    """Per parameter: its element count and the searched groups that cut it (name, full size)."""
    from modelpress.search.supernet import searched_groups

    cuts: dict[str, list[tuple[str, int]]] = {}
    for gname in searched_groups(net.space):
        g = net.graph.group(gname)
        for param, _axis in g.slots:
            cuts.setdefault(param, []).append((g.name, g.size))
    return {name: (p.numel(), cuts.get(name, [])) for name, p in net.graph.module.named_parameters()}


def as_minimize(objectives: list[str], values: dict[str, float]) -> np.ndarray:
    """Objective values as a vector to minimize (quality negated)."""
    return np.array([-values[o] if OBJECTIVES[o] == "max" else values[o] for o in objectives], dtype=float)
