"""What placement needs of each sub-model: its weight memory and its latency on each device (beside the full
model's, measured in the same interleaved run, so the report can say how much faster each sub-model is), and
of each device measured through its agent, the memory it reports available when no budget is given."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torch import nn

from modelpress.graph import ModelGraph
from modelpress.progress import Reporter
from modelpress.prune.classwise.result import SubModel, export_graph
from modelpress.prune.placement import Device

FULL = "full"  # the full model's name in the measurement


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers: the memory a device needs to hold it."""
    tensors = list(module.parameters()) + list(module.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


@dataclass
class Latencies:
    """Latency in ms at batch 1: ``sub_models[i][j]`` of sub-model i on device j; ``full[j]`` the full
    model's on device j (None where the device's latencies were given, not measured)."""

    sub_models: list[list[float]]
    full: list[float | None]


def measure_latencies(graph: ModelGraph, subs: list[SubModel], devices: list[Device], scratch: Path,
                      reporter: Reporter) -> Latencies:
    """Given latencies, or the sub-models and the full model measured interleaved at batch 1, once per
    distinct target."""
    from modelpress.bench import get_target, measure

    out = np.zeros((len(subs), len(devices)))
    full: list[float | None] = [None] * len(devices)
    measured: dict[tuple[str, int], tuple[list[float], float]] = {}
    files: dict[str, Path] = {}
    for j, d in enumerate(devices):
        if d.latency_ms is not None:
            out[:, j] = d.latency_ms
            continue
        tgt = get_target(d.target or "ort-cpu")
        key = (tgt.name, tgt.threads)
        if key not in measured:
            if not files:
                files[FULL] = export_graph(graph, scratch / "full.onnx", 17)
                for s in subs:
                    files[s.name] = export_graph(s.graph, scratch / f"{s.name}.onnx", 17)
            with reporter.step(f"measuring {len(subs)} sub-models and the full model on {tgt.name} (batch 1)"):
                bench = measure(files, graph.input_spec, tgt, batch_sizes=[1], memory=False)
            measured[key] = ([bench.stats(s.name, 1).median_ms for s in subs], bench.stats(FULL, 1).median_ms)
        out[:, j], full[j] = measured[key]
    return Latencies(out.tolist(), full)


def device_memory(device: Device) -> Device:
    """A device measured through its agent (a ``remote:HOST:PORT`` target) without a memory budget gets the
    memory the agent reports available; other devices are returned as they are."""
    if device.memory_bytes is not None or device.target is None:
        return device
    from modelpress.targets import get_target

    tgt = get_target(device.target)
    if not tgt.remote:
        return device
    from modelpress.bench.remote import AgentClient

    available = AgentClient(tgt).info().get("memory_available_bytes")
    return replace(device, memory_bytes=int(available)) if available else device
