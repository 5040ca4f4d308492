"""One measurement on the device: the request checked, the variants timed with the interleaved protocol of
:mod:`modelpress.timing` (memory probed first, each variant's output digest taken), the raw per-round
samples returned so the client computes the same statistics as a local run."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.agent.protocol import SHA256, safe_relative_name
from modelpress.agent.store import Store
from modelpress.errors import ModelpressError
from modelpress.system import system_info
from modelpress.targets import Target
from modelpress.timing import (
    interleave,
    onnx_digests,
    onnx_runner,
    parse_shape_key,
    probe_onnx_memory,
    shape_key,
)

# Session config entries a client may set (thread behaviour and numerics); others are refused.
SESSION_CONFIG_PREFIXES = ("session.intra_op.", "session.inter_op.", "session.set_denormal_as_zero",
                           "session.disable_prepacking", "session.qdq", "session.enable_quant_qdq")
# Provider options a client may set: none writes files on the device (no engine cache paths).
PROVIDER_OPTION_KEYS = {"device_id", "trt_fp16_enable", "trt_int8_enable", "trt_max_workspace_size",
                        "trt_builder_optimization_level", "cudnn_conv_algo_search", "do_copy_in_default_stream"}
LIMITS = {"rounds": (1, 100), "runs": (1, 100_000), "warmup": (0, 1000), "max_runs": (1, 1_000_000),
          "profile_runs": (1, 1000)}
TIME_LIMITS = {"min_time_s": (0.0, 60.0), "max_time_s": (0.01, 600.0)}


class BadRequest(ValueError):
    """A measurement request the agent refuses (HTTP 400)."""


@dataclass
class Request:
    """A checked measurement request."""

    variants: dict[str, dict[str, Any]]  # name -> {"model": sha, "data": {relative name: sha}}
    inputs: str  # sha of the .npz holding "SHAPE::INPUT" arrays
    shapes: list[tuple[int, int | None]]
    providers: tuple[str, ...]
    threads: int
    session_config: tuple[tuple[str, str], ...]
    provider_options: tuple[dict[str, Any], ...]
    timing: dict[str, Any]
    memory: bool
    digests: bool
    profile: bool = False  # ONNX Runtime's per-node times of each variant at the first shape

    def files(self) -> dict[str, str]:
        """Every file the request needs: sha -> kind."""
        out = {self.inputs: "inputs"}
        for spec in self.variants.values():
            out[spec["model"]] = "model"
            for sha in spec["data"].values():
                out.setdefault(sha, "data")
        return out


def _sha(value: Any, what: str) -> str:
    if not isinstance(value, str) or not SHA256.match(value):
        raise BadRequest(f"{what} must be a SHA-256 (64 lowercase hex digits)")
    return value


def _number(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float, kind: type) -> Any:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"{key} must be a number")
    if not lo <= value <= hi:
        raise BadRequest(f"{key} must be between {lo} and {hi}, got {value}")
    return kind(value)


def parse_request(body: Any, available: list[str], default_providers: tuple[str, ...], default_threads: int,
                  max_threads: int) -> Request:
    """Check a measurement request's JSON; raises BadRequest naming the first problem."""
    if not isinstance(body, dict):
        raise BadRequest("the request must be a JSON object")
    variants = body.get("variants")
    if not isinstance(variants, dict) or not variants or len(variants) > 256:
        raise BadRequest("variants must map 1 to 256 names to files")
    checked: dict[str, dict[str, Any]] = {}
    for name, spec in variants.items():
        if not isinstance(spec, dict) or not isinstance(name, str) or not name or len(name) > 200:
            raise BadRequest(f"variant {name!r} must be an object with a model")
        data = spec.get("data") or {}
        if not isinstance(data, dict):
            raise BadRequest(f"variant {name!r}: data must map file names to SHA-256s")
        try:
            clean = {str(safe_relative_name(k)): _sha(v, f"variant {name!r} data {k!r}") for k, v in data.items()}
        except ValueError as exc:
            raise BadRequest(f"variant {name!r}: {exc}") from None
        if "model.onnx" in clean:
            raise BadRequest(f"variant {name!r}: external data may not be called model.onnx")
        checked[name] = {"model": _sha(spec.get("model"), f"variant {name!r} model"), "data": clean}
    shapes_raw = body.get("shapes")
    if not isinstance(shapes_raw, list) or not shapes_raw or len(shapes_raw) > 64:
        raise BadRequest("shapes must list 1 to 64 shape names like b1_s128")
    try:
        shapes = [parse_shape_key(str(s)) for s in shapes_raw]
    except ModelpressError as exc:
        raise BadRequest(exc.problem) from None
    providers = body.get("providers") or list(default_providers)
    if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
        raise BadRequest("providers must be a list of ONNX Runtime provider names")
    missing = [p for p in providers if p not in available]
    if missing:
        raise BadRequest(f"this device's ONNX Runtime does not offer {', '.join(missing)} "
                         f"(it offers {', '.join(available)})")
    threads = _number(body, "threads", 0, 0, max_threads, int) or default_threads
    config = body.get("session_config") or {}
    if not isinstance(config, dict) or not all(isinstance(v, str) for v in config.values()):
        raise BadRequest("session_config must map names to strings")
    refused = [k for k in config if not str(k).startswith(SESSION_CONFIG_PREFIXES)]
    if refused:
        raise BadRequest(f"session config entries {refused} are not allowed on this agent")
    options = body.get("provider_options") or []
    if not isinstance(options, list) or not all(isinstance(o, dict) for o in options):
        raise BadRequest("provider_options must be a list of objects")
    bad = sorted({k for o in options for k in o if k not in PROVIDER_OPTION_KEYS})
    if bad:
        raise BadRequest(f"provider options {bad} are not allowed on this agent")
    timing = {k: _number(body, k, d, *LIMITS[k], int) for k, d in
              (("rounds", 3), ("runs", 10), ("warmup", 3), ("max_runs", 10_000), ("profile_runs", 10))}
    timing.update({k: _number(body, k, d, *TIME_LIMITS[k], float) for k, d in
                   (("min_time_s", 0.3), ("max_time_s", 60.0))})
    return Request(
        variants=checked, inputs=_sha(body.get("inputs"), "inputs"), shapes=shapes, providers=tuple(providers),
        threads=threads, session_config=tuple(sorted((str(k), v) for k, v in config.items())),
        provider_options=tuple(dict(o) for o in options), timing=timing, memory=bool(body.get("memory", True)),
        digests=bool(body.get("digests", True)), profile=bool(body.get("profile", False)),
    )


def run_measurement(req: Request, store: Store, device: str, extra_system: Mapping[str, Any]) -> dict[str, Any]:
    """Time the request's variants on this device; returns the JSON answer (raw samples, memory, digests, the
    device's target and system). Raises ModelpressError when ONNX Runtime cannot load a variant."""
    target = Target(name=device, providers=req.providers, threads=req.threads, session_config=req.session_config,
                    provider_options=req.provider_options, description="this device")
    arrays = store.load_inputs(req.inputs)
    feeds: dict[tuple[int, int | None], dict[str, np.ndarray]] = {}
    for shape in req.shapes:
        prefix = shape_key(*shape) + "::"
        feeds[shape] = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        if not feeds[shape]:
            raise BadRequest(f"the inputs hold no arrays for shape {shape_key(*shape)}")
    started = time.time()
    with store.workspace(req.variants) as paths:
        names = list(paths)
        peak: dict[str, dict[str, float | None]] = {}
        memory_errors: dict[str, str] = {}
        if req.memory:
            with tempfile.TemporaryDirectory(dir=store.work, prefix="probe-") as tmp:
                for name in names:
                    try:
                        peak[name] = probe_onnx_memory(paths[name], target, feeds, req.shapes, Path(tmp))
                    except Exception as exc:  # a failed probe must not lose the timings
                        memory_errors[name] = f"{type(exc).__name__}: {exc}"
        digests = {name: onnx_digests(paths[name], target, feeds, name) for name in names} if req.digests else {}
        first = feeds[req.shapes[0]]
        node_times = ({name: target.node_times(paths[name], first, runs=req.timing["profile_runs"]) for name in names}
                      if req.profile else {})
        samples, cpu = interleave(
            names, lambda name: onnx_runner(paths[name], target, name), lambda _name: feeds, req.shapes,
            rounds=req.timing["rounds"], warmup=req.timing["warmup"], runs=req.timing["runs"],
            min_time_s=req.timing["min_time_s"], max_time_s=req.timing["max_time_s"],
            max_runs=req.timing["max_runs"],
        )
    finished = time.time()
    system = system_info(target.threads)
    system.update(extra_system)
    return {
        "target": {**target.to_dict(), "description": f"device {device}"},
        "system": system,
        "samples": {n: {shape_key(*s): v for s, v in samples[n].items()} for n in names},
        "cpu": {n: {shape_key(*s): v for s, v in cpu[n].items()} for n in names},
        "peak": peak,
        "memory_errors": memory_errors,
        "digests": digests,
        "node_times": node_times,
        "started": started,
        "finished": finished,
    }
