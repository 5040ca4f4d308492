"""Placing K sub-models on a list of devices: greedy, memory-aware, minimizing the slowest device's load.

A device has a name, a memory budget (bytes) and either a Target (sub-models are measured there) or
latencies given per sub-model. Sub-models placed on one device run one after another, so a device's load
is the sum of its sub-models' latencies, and the split answers when its slowest device is done.

The rule (longest processing time first, generalized to unequal devices): take the sub-models in order of
decreasing mean latency over the devices; put each on the device where it would finish earliest (current
load plus its latency there) among those with memory left for it; ties go to the earlier device. On equal
devices this is Graham's LPT, within 4/3 of the best makespan. A sub-model that fits on no device is an
error, raised before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelpress.errors import ModelpressError
from modelpress.targets import Target

__all__ = ["Assignment", "Device", "assign"]


@dataclass(frozen=True)
class Device:
    """One device: ``memory_bytes`` for the weights of the sub-models it holds (None: unlimited), and
    ``target`` (a Target or a target name, measured there) or ``latency_ms`` (one value per sub-model, in
    the split's order; skips the measurement)."""

    name: str
    memory_bytes: int | None = None
    target: Target | str | None = None
    latency_ms: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ModelpressError(f"device {self.name!r}: memory budget must be positive, got {self.memory_bytes}",
                                  "give the budget in bytes (memory_mb in a recipe)")
        if self.target is not None and self.latency_ms is not None:
            raise ModelpressError(f"device {self.name!r} has both a target and given latencies",
                                  "give one: target (measured) or latency_ms (given)")

    @classmethod
    def parse(cls, value: Device | dict[str, Any]) -> Device:
        """A Device, or a recipe's mapping ``{name, memory_mb | memory_bytes, target | latency_ms}``."""
        if isinstance(value, Device):
            return value
        value = dict(value)
        unknown = set(value) - {"name", "memory_mb", "memory_bytes", "target", "latency_ms"}
        if unknown or "name" not in value:
            raise ModelpressError(f"device {value} is not understood (unknown keys {sorted(unknown)})",
                                  "give name, memory_mb (or memory_bytes), and target or latency_ms")
        memory = value.get("memory_bytes")
        if value.get("memory_mb") is not None:
            memory = int(float(value["memory_mb"]) * 2**20)
        latency = value.get("latency_ms")
        return cls(str(value["name"]), None if memory is None else int(memory), value.get("target"),
                   None if latency is None else tuple(float(x) for x in latency))


@dataclass
class Assignment:
    """Where each sub-model runs: ``device[i]`` for sub-model i, each device's load (ms) and memory
    (bytes), and the makespan (the slowest device's load)."""

    devices: list[str]
    device: list[str]
    latency_ms: list[list[float]]  # [sub-model][device]
    memory_bytes: list[int]
    loads_ms: dict[str, float] = field(default_factory=dict)
    used_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def makespan_ms(self) -> float:
        return max(self.loads_ms.values()) if self.loads_ms else 0.0

    def to_dict(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(names) if names is not None else [f"sub{i}" for i in range(len(self.device))]
        rows = []
        for i, dev in enumerate(self.device):
            j = self.devices.index(dev)
            rows.append({"sub_model": names[i], "device": dev, "latency_ms": self.latency_ms[i][j],
                         "memory_bytes": self.memory_bytes[i]})
        return {"rule": "greedy longest-first onto the earliest-finishing device with memory left",
                "rows": rows, "loads_ms": self.loads_ms, "used_bytes": self.used_bytes,
                "makespan_ms": self.makespan_ms}

    def to_text(self, names: Sequence[str] | None = None) -> str:
        """A readable table: one line per sub-model, then each device's load."""
        table = self.to_dict(names)
        lines = [f"{'sub-model':<12} {'device':<16} {'latency ms':>11} {'memory MB':>10}"]
        for r in table["rows"]:
            lines.append(f"{r['sub_model']:<12} {r['device']:<16} {r['latency_ms']:>11.3f} "
                         f"{r['memory_bytes'] / 2**20:>10.3f}")
        lines.append("")
        for dev in self.devices:
            lines.append(f"{dev:<16} load {self.loads_ms[dev]:.3f} ms, {self.used_bytes[dev] / 2**20:.3f} MB")
        lines.append(f"slowest device: {self.makespan_ms:.3f} ms")
        return "\n".join(lines) + "\n"


def assign(
    latency_ms: Sequence[Sequence[float]],
    memory_bytes: Sequence[int],
    devices: Sequence[Device],
    names: Sequence[str] | None = None,
) -> Assignment:
    """Place sub-model i (``latency_ms[i][j]`` on device j, ``memory_bytes[i]`` of weights) on the devices;
    see the module docstring for the rule. Raises ModelpressError when one fits nowhere."""
    lat = np.asarray(latency_ms, dtype=np.float64)
    n = len(memory_bytes)
    if not devices:
        raise ModelpressError("no devices to place the sub-models on", "give at least one device")
    if lat.shape != (n, len(devices)):
        raise ModelpressError(f"latencies have shape {lat.shape}, expected ({n}, {len(devices)})",
                              "give one latency per sub-model and device")
    if len({d.name for d in devices}) != len(devices):
        raise ModelpressError("device names repeat", "give every device its own name")
    names = list(names) if names is not None else [f"sub{i}" for i in range(n)]
    loads = np.zeros(len(devices))
    used = np.zeros(len(devices), dtype=np.int64)
    where = [-1] * n
    for i in sorted(range(n), key=lambda i: (-float(lat[i].mean()), i)):
        fits = [j for j, d in enumerate(devices)
                if d.memory_bytes is None or used[j] + memory_bytes[i] <= d.memory_bytes]
        if not fits:
            free = max((d.memory_bytes - used[j] for j, d in enumerate(devices)), default=0)
            raise ModelpressError(
                f"sub-model {names[i]} ({memory_bytes[i] / 2**20:.2f} MB) fits on no device "
                f"(the most memory left on one is {free / 2**20:.2f} MB)",
                "give the devices more memory, add a device, or prune harder (a smaller ratio)",
            )
        j = min(fits, key=lambda j: (loads[j] + lat[i, j], j))
        where[i] = j
        loads[j] += lat[i, j]
        used[j] += int(memory_bytes[i])
    dev_names = [d.name for d in devices]
    return Assignment(
        devices=dev_names,
        device=[dev_names[j] for j in where],
        latency_ms=lat.tolist(),
        memory_bytes=[int(m) for m in memory_bytes],
        loads_ms={d: float(loads[j]) for j, d in enumerate(dev_names)},
        used_bytes={d: int(used[j]) for j, d in enumerate(dev_names)},
    )
