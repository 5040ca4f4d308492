"""Never hand back a slower model: after the INT8 export, measure it against the same model in float on
the target's shapes (its batch sizes); where INT8 loses at any of them, find the blocks that pay (ONNX Runtime's profiler, node times summed per
block) and keep their layers float; if the model is still slower, hand back the float model with the reason.

Node times are attributed to blocks by name: the ONNX exporter names every node after its module scope
("/module/layer1/layer1.0/conv1/Conv"), and ONNX Runtime keeps that prefix when it fuses nodes, so the
scope says which block a kernel belongs to; nodes outside every block (stem, head) go to "" (the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

# a ratio within this of 1 is the same speed (the timing noise of interleaved rounds on a shared CPU)
SAME_SPEED = 0.03


def module_path(node_name: str) -> str:
    """The module path of an exported node's scope: "/module/layer2/layer2.0/downsample/downsample.0/Conv"
    -> "layer2.0.downsample.0"; "" for nodes without a scope."""
    parts = [p for p in node_name.split("/") if p][:-1]
    if parts and parts[0] == "module":
        parts = parts[1:]
    names: list[str] = []  # a scope extends the previous one ("layer2" then "layer2.0"): replace it
    for p in parts:
        if names and p.startswith(names[-1] + "."):
            names[-1] = p
        else:
            names.append(p)
    return ".".join(names)


def layer_units(layers: Sequence[str]) -> list[str]:
    """The units the guard decides on: for each layer, its path up to the first item index (an item of an
    nn.Sequential / nn.ModuleList: "features.3.block.0.0" -> "features.3", "layer2.0.conv1" -> "layer2.0");
    layers outside every container (a stem conv, the classifier) share the unit "". One rule for ResNet
    stages, MobileNet feature lists and transformer layer lists, residual or not."""
    units = set()
    for name in layers:
        parts = name.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                units.add(".".join(parts[: i + 1]))
                break
    return sorted(units)


def block_of(path: str, blocks: Sequence[str]) -> str:
    """The longest block path that ``path`` lies in ("" when none)."""
    inside = [b for b in blocks if path == b or path.startswith(b + ".")]
    return max(inside, key=len) if inside else ""


def block_times(node_times: Mapping[str, float], blocks: Sequence[str]) -> dict[str, float]:
    """Milliseconds per block (and "" for the rest) from per-node times."""
    out: dict[str, float] = {}
    for name, ms in node_times.items():
        key = block_of(module_path(name), blocks)
        out[key] = out.get(key, 0.0) + ms
    return out


def blocks_that_lose(int8: Mapping[str, float], fp32: Mapping[str, float], margin: float = SAME_SPEED) -> list[str]:
    """Blocks whose INT8 time exceeds their float time by more than ``margin`` (a fraction), slowest loss
    first: the layers worth keeping float. Blocks missing on one side are left alone."""
    losing = [(int8[b] - fp32[b], b) for b in int8 if b in fp32 and int8[b] > fp32[b] * (1.0 + margin)]
    return [b for _, b in sorted(losing, reverse=True)]


def slower_shapes(bench: Mapping[str, Any], variant: str, margin: float = SAME_SPEED) -> list[dict]:
    """The measured shapes where ``variant`` (in a BenchReport dict) is slower than the baseline."""
    shapes = bench.get("variants", {}).get(variant, {}).get("shapes") or []
    return [s for s in shapes if s.get("speedup") and s["speedup"] < 1.0 - margin]


def keep_faster(
    *,
    measure: Callable[[], dict],
    profile: Callable[[], tuple[dict[str, float], dict[str, float]]],
    layers_in: Callable[[Sequence[str]], list[str]],
    keep_float: Callable[[list[str]], None],
    reexport: Callable[[], None],
    give_up: Callable[[], None],
    blocks: Sequence[str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The decision procedure (module doc), over callables so that it runs on any measurement: ``measure``
    -> BenchReport dict of {"float", "int8"}; ``profile`` -> (int8, float) node times; ``layers_in(blocks)``
    -> quantized layers inside them; ``keep_float(layers)``; ``reexport()``; ``give_up()`` hands back float.
    Returns what was decided, for the report."""
    first = measure()
    if not slower_shapes(first, "int8"):
        return {"decision": "int8", "speedups": _speedups(first)}
    int8_nodes, float_nodes = profile()
    losing = blocks_that_lose(block_times(int8_nodes, blocks), block_times(float_nodes, blocks))
    layers = layers_in(losing)
    out: dict[str, Any] = {"speedups_before": _speedups(first), "blocks_kept_float": losing, "layers_kept_float": layers}
    if layers and len(set(layers)) < len(set(layers_in([*blocks, ""]))):
        log(f"INT8 measured slower than float at some shapes ({_speedups(first)}); keeping float the layers of "
            f"{len(losing)} block(s) where it loses: {', '.join(b or '(outside blocks)' for b in losing)}")
        keep_float(layers)
        reexport()
        again = measure()
        if not slower_shapes(again, "int8"):
            return {**out, "decision": "int8 (partly float)", "speedups": _speedups(again)}
        out["speedups_partly_float"] = _speedups(again)
    give_up()
    reason = (f"the INT8 model measured slower than float at some of the target's shapes ({_speedups(first)})"
              + (" even with the losing blocks float" if "speedups_partly_float" in out else ""))
    log(f"[yellow]warning[/yellow]: {reason}: handing back the float model")
    return {**out, "decision": "float", "reason": reason}


def _speedups(bench: Mapping[str, Any]) -> dict[str, float]:
    shapes = bench.get("variants", {}).get("int8", {}).get("shapes") or []
    return {f"batch {s.get('batch')}": round(float(s["speedup"]), 3) for s in shapes if s.get("speedup")}
