"""The latency runner: interleaved, repeated measurement of several variants of a model on one Target.

Protocol (see the field notes: one variant timed alone, then another, can differ by 1.5x for the
same graph on a shared machine):

1. Build everything first: every ONNX file must exist, inputs are made once per shape.
2. Optionally probe peak memory of each variant (ONNX variants in a fresh subprocess).
3. Time the variants round-robin for ``rounds`` rounds; each round creates a fresh InferenceSession
   per variant, warms up, then times ``runs`` runs (or more, until ``min_time_s`` has passed)
   per shape. The variant order rotates every round so no variant always runs first.
4. Per variant and shape: the median of the per-round medians, p90/p99 and the coefficient of
   variation over all timed runs, throughput, and the speedup against the baseline as the median of
   the per-round ratios (baseline median / variant median, both from the same round).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.export.files import onnx_file_size
from modelpress.graph.inputs import InputSpec
from modelpress.graph.run import TorchCall, eval_mode
from modelpress.progress import QUIET, Reporter
from modelpress.system import load_average, system_info
from modelpress.targets import Target, get_target
from modelpress.timing import interleave, onnx_runner, probe_onnx_memory, shape_key

Variant = os.PathLike | str | nn.Module

MEMORY_METHOD = (
    "peak resident memory (MiB) above a baseline taken just before the session or forward pass. "
    "ONNX variants: measured in a fresh subprocess that imports only numpy and onnxruntime, resets the "
    "kernel's peak counter (/proc/self/clear_refs), then creates the session and runs each shape, "
    "smallest first (weights + arenas + activations). Torch variants: parameter and buffer bytes plus "
    "the peak RSS increase of one forward pass in this process (activations), so both count weights."
)

# --------------------------------------------------------------------------------------------- results


@dataclass
class ShapeStats:
    """Timing of one variant at one input shape."""

    batch: int
    seq_len: int | None
    median_ms: float
    p90_ms: float
    p99_ms: float
    cv: float  # standard deviation / mean over all timed runs
    throughput: float  # samples per second at the median latency
    runs: int  # timed runs over all rounds
    round_medians_ms: list[float]
    speedup: float | None = None  # median over rounds of baseline_ms / variant_ms
    speedup_rounds: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None
    # Median process CPU time per run (all threads). Steadier than wall time on a shared machine, but
    # it counts ONNX Runtime's and OpenMP's spin-waiting when threads > 1: compare it at 1 thread.
    cpu_ms: float | None = None


@dataclass
class VariantResult:
    """One measured variant: an ONNX file or a torch module."""

    name: str
    kind: str  # "onnx" or "torch"
    path: str | None
    file_size_bytes: int | None  # ONNX: file + external data; torch: parameter + buffer bytes
    shapes: list[ShapeStats]
    memory_error: str | None = None
    # SHA-256 of the outputs per shape (b1_s128: digest), from a device: compare with a local run's
    # (modelpress.timing.onnx_digests) to check the device computes the same thing
    output_digests: dict[str, str] = field(default_factory=dict)


@dataclass
class BenchReport:
    """All measurements of one interleaved run, with the target and the machine they were taken on."""

    target: dict[str, Any]
    system: dict[str, Any]
    baseline: str | None
    rounds: int
    variants: dict[str, VariantResult]
    memory_method: str = MEMORY_METHOD
    seconds: float = 0.0
    created: str = ""
    load_average: list[float | None] = field(default_factory=list)  # 1-minute load before and after

    def stats(self, variant: str, batch: int, seq_len: int | None = None) -> ShapeStats:
        """The stats of ``variant`` at one shape (``seq_len`` may be left out when only one was measured)."""
        try:
            result = self.variants[variant]
        except KeyError:
            raise ModelpressError(
                f"no variant {variant!r} in this report", f"have: {', '.join(self.variants)}"
            ) from None
        matches = [s for s in result.shapes if s.batch == batch and (seq_len is None or s.seq_len == seq_len)]
        if not matches:
            raise ModelpressError(
                f"variant {variant!r} was not measured at batch {batch}, sequence {seq_len}"
            )
        return matches[0]

    def speedup(self, variant: str, batch: int, seq_len: int | None = None) -> float | None:
        """Speedup of ``variant`` over the baseline (median of per-round ratios)."""
        return self.stats(variant, batch, seq_len).speedup

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "system": self.system,
            "baseline": self.baseline,
            "rounds": self.rounds,
            "seconds": round(self.seconds, 2),
            "created": self.created,
            "load_average_1min": self.load_average,
            "memory_method": self.memory_method,
            "variants": {name: asdict(v) for name, v in self.variants.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    def write_json(self, path: os.PathLike | str) -> Path:
        """Write the report atomically (temporary file in the same folder, then rename)."""
        return write_json_atomic(path, self.to_dict())

    def to_table(self, title: str | None = None):  # noqa: ANN201 - rich.table.Table
        """A rich Table: one row per variant and shape."""
        from rich.table import Table

        table = Table(
            title=title or f"latency on {self.target.get('name')} ({self.target.get('threads')} threads)"
        )
        for col in (
            "variant",
            "batch",
            "seq",
            "median ms",
            "p90 ms",
            "p99 ms",
            "CV %",
            "CPU ms",
            "samples/s",
        ):
            table.add_column(col, justify="left" if col == "variant" else "right")
        table.add_column(f"speedup vs {self.baseline}" if self.baseline else "speedup", justify="right")
        table.add_column("peak MiB", justify="right")
        table.add_column("size MB", justify="right")
        for v in self.variants.values():
            for s in v.shapes:
                table.add_row(
                    v.name,
                    str(s.batch),
                    "-" if s.seq_len is None else str(s.seq_len),
                    f"{s.median_ms:.2f}",
                    f"{s.p90_ms:.2f}",
                    f"{s.p99_ms:.2f}",
                    f"{100 * s.cv:.1f}",
                    "-" if s.cpu_ms is None else f"{s.cpu_ms:.1f}",
                    f"{s.throughput:.1f}",
                    "-" if s.speedup is None else f"{s.speedup:.2f}x",
                    "-" if s.peak_memory_mb is None else f"{s.peak_memory_mb:.0f}",
                    "-" if v.file_size_bytes is None else f"{v.file_size_bytes / 1e6:.1f}",
                )
        return table


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json_atomic(path: os.PathLike | str, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=_json_default)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------------------------------- measuring


def _shapes(input_spec: InputSpec, batch_sizes: list[int], seq_lens: list[int] | None) -> list[tuple]:
    if input_spec.kind == "text":
        # a target's sequence lengths, capped at what the model takes (no 128 on a 64-position model)
        seqs = sorted({input_spec.fit_seq_len(s) for s in (seq_lens or [input_spec.default_seq_len])})
        return sorted(((b, s) for b in batch_sizes for s in seqs), key=lambda bs: (bs[0] * bs[1], bs))
    return [(b, None) for b in sorted(set(batch_sizes))]


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with torch on ``threads`` intra-op threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _param_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _probe_torch_memory(
    module: nn.Module, names: list[str], feeds: dict[tuple, tuple], shapes: list[tuple], threads: int
) -> dict[str, float | None]:
    run = TorchCall(module, names, inference=True)
    weights_mb = _param_bytes(module) / 2**20
    out: dict[str, float | None] = {}
    with torch_threads(threads):
        for shape in shapes:
            with peak_rss() as mem:
                run(feeds[shape])
            out[shape_key(*shape)] = None if mem["mb"] is None else weights_mb + mem["mb"]
    return out


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, float | None]]:
    """Yields a dict that gets ``mb``: the process's peak RSS above its RSS at entry, in MiB (the kernel's
    high-water mark, reset at entry; None where /proc does not offer it)."""
    out: dict[str, float | None] = {"mb": None}
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status_kb("VmRSS")
    except OSError:
        base = None
    yield out
    hwm = _status_kb("VmHWM")
    out["mb"] = None if base is None or hwm is None else (hwm - base) / 1024.0


@contextlib.contextmanager
def _eval_modules(modules: list[nn.Module]) -> Iterator[None]:
    """Eval mode while measuring; each module's own mode is restored afterwards."""
    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(eval_mode(m))
        yield


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(
    variants: Mapping[str, Variant],
    input_spec: InputSpec,
    target: Target | str = "ort-cpu",
    *,
    rounds: int = 3,
    runs: int = 10,
    min_time_s: float = 0.3,
    warmup: int = 3,
    max_runs: int = 10_000,
    max_time_s: float = 60.0,
    baseline: str | None = None,
    batch_sizes: list[int] | None = None,
    seq_lens: list[int] | None = None,
    memory: bool = True,
    reporter: Reporter = QUIET,
) -> BenchReport:
    """Time ONNX files (paths) and torch modules interleaved on ``target``; see the module docstring.

    ``baseline`` names the variant speedups are relative to (default: the first). Shapes default to the
    target's batch sizes and sequence lengths (sequence only for text inputs). Each round times every
    shape at least ``runs`` times and for at least ``min_time_s`` seconds after ``warmup`` runs, but
    stops a shape after ``max_time_s`` seconds (so a very slow variant cannot stall the run).
    """
    started = time.perf_counter()
    load_before = load_average()
    target = get_target(target)
    if not variants:
        raise ModelpressError("nothing to measure: no variants given")
    if rounds < 1 or runs < 1:
        raise ModelpressError(f"rounds and runs must be at least 1 (got rounds={rounds}, runs={runs})")
    names = list(variants)
    baseline = names[0] if baseline is None else baseline
    if baseline not in variants:
        raise ModelpressError(
            f"baseline {baseline!r} is not one of the variants", f"use one of: {', '.join(names)}"
        )
    onnx_paths: dict[str, Path] = {}
    modules: dict[str, nn.Module] = {}
    for name, value in variants.items():
        if isinstance(value, nn.Module):
            if target.device != "cpu":
                raise ModelpressError(
                    f"torch variant {name!r} cannot be measured on {target.name!r} yet",
                    "use the ort-cpu target",
                )
            modules[name] = value
        else:
            path = Path(value)
            if not path.is_file():
                raise ModelpressError(f"variant {name!r}: no ONNX file at {path}", "export the model first")
            onnx_paths[name] = path
    if onnx_paths:
        target.require_available()

    shapes = _shapes(input_spec, list(batch_sizes or target.batch_sizes), seq_lens or list(target.seq_lens))
    np_feeds = {s: input_spec.make(s[0], s[1]) for s in shapes}
    torch_feeds = {s: tuple(torch.from_numpy(np_feeds[s][n]) for n in input_spec.names) for s in shapes}
    target_info, system, digests = target.to_dict(), None, {}

    if target.address is not None:  # a device running `modelpress agent`: the same protocol, run there
        if modules:
            raise ModelpressError(
                f"torch variants ({', '.join(modules)}) cannot be measured on the device {target.name}",
                "export them to ONNX first; the agent runs ONNX files only",
            )
        from modelpress.bench.remote import measure_remote

        remote = measure_remote(
            target, onnx_paths, np_feeds, shapes, rounds=rounds, runs=runs, min_time_s=min_time_s,
            warmup=warmup, max_runs=max_runs, max_time_s=max_time_s, memory=memory, reporter=reporter,
        )
        samples, cpu_samples, peak, memory_errors = remote.samples, remote.cpu, remote.peak, remote.memory_errors
        target_info, system, digests = remote.target, remote.system, remote.digests
    else:
        samples, cpu_samples, peak, memory_errors = _measure_here(
            names, target, input_spec, onnx_paths, modules, shapes, np_feeds, torch_feeds, rounds=rounds, runs=runs,
            min_time_s=min_time_s, warmup=warmup, max_runs=max_runs, max_time_s=max_time_s, memory=memory,
            reporter=reporter,
        )
    return _report(names, baseline, shapes, samples, cpu_samples, peak, memory_errors, onnx_paths, modules,
                   target_info, system if system is not None else system_info(target.threads), digests, rounds,
                   started, load_before)


Samples = dict[str, dict[tuple, list[list[float]]]]
CpuSamples = dict[str, dict[tuple, list[float]]]


def _measure_here(
    names: list[str], target: Target, input_spec: InputSpec, onnx_paths: dict[str, Path], modules: dict[str, nn.Module],
    shapes: list[tuple], np_feeds: dict[tuple, dict[str, np.ndarray]], torch_feeds: dict[tuple, tuple], *,
    rounds: int, runs: int, min_time_s: float, warmup: int, max_runs: int, max_time_s: float, memory: bool,
    reporter: Reporter,
) -> tuple[Samples, CpuSamples, dict[str, dict[str, float | None]], dict[str, str]]:
    """Probe memory, then time the variants interleaved in this process."""
    with _eval_modules(list(modules.values())):
        # Memory first, so the probes' allocations do not sit inside the timed rounds.
        peak: dict[str, dict[str, float | None]] = {}
        memory_errors: dict[str, str] = {}
        if memory:
            with tempfile.TemporaryDirectory(prefix="modelpress-bench-") as tmp:
                for name in reporter.track(names, "probing memory"):
                    try:
                        if name in onnx_paths:
                            peak[name] = probe_onnx_memory(
                                onnx_paths[name], target, np_feeds, shapes, Path(tmp)
                            )
                        else:
                            peak[name] = _probe_torch_memory(
                                modules[name], input_spec.names, torch_feeds, shapes, target.threads
                            )
                    except Exception as exc:  # a failed probe must not lose the timings
                        memory_errors[name] = f"{type(exc).__name__}: {exc}"

        def make_run(name: str) -> Callable[[Any], Any]:
            if name in onnx_paths:
                return onnx_runner(onnx_paths[name], target, name)
            return TorchCall(modules[name], input_spec.names, inference=True)

        with torch_threads(target.threads):
            samples, cpu_samples = interleave(
                names, make_run, lambda name: np_feeds if name in onnx_paths else torch_feeds, shapes,
                rounds=rounds, warmup=warmup, runs=runs, min_time_s=min_time_s, max_time_s=max_time_s,
                max_runs=max_runs, track=reporter.track,
            )
    return samples, cpu_samples, peak, memory_errors


def _report(
    names: list[str], baseline: str, shapes: list[tuple], samples: Samples, cpu_samples: CpuSamples,
    peak: dict[str, dict[str, float | None]], memory_errors: dict[str, str], onnx_paths: dict[str, Path],
    modules: dict[str, nn.Module], target_info: dict[str, Any], system: dict[str, Any],
    digests: dict[str, dict[str, str]], rounds: int, started: float, load_before: float | None,
) -> BenchReport:
    """The statistics of every variant and shape from the per-round samples (local or a device's)."""
    results: dict[str, VariantResult] = {}
    for name in names:
        stats = []
        for shape in shapes:
            per_round = samples[name][shape]
            medians = [float(np.median(t)) for t in per_round]
            base_medians = [float(np.median(t)) for t in samples[baseline][shape]]
            ratios = [b / m for b, m in zip(base_medians, medians, strict=True) if m > 0]
            pooled = [x for t in per_round for x in t]
            median = float(np.median(medians))
            mean = float(np.mean(pooled))
            stats.append(
                ShapeStats(
                    batch=shape[0],
                    seq_len=shape[1],
                    median_ms=median,
                    p90_ms=_percentile(pooled, 90),
                    p99_ms=_percentile(pooled, 99),
                    cv=float(np.std(pooled) / mean) if mean > 0 else 0.0,
                    throughput=shape[0] * 1000.0 / median if median > 0 else 0.0,
                    runs=len(pooled),
                    round_medians_ms=medians,
                    speedup=float(np.median(ratios)) if ratios else None,
                    speedup_rounds=ratios,
                    peak_memory_mb=peak.get(name, {}).get(shape_key(*shape)),
                    cpu_ms=float(np.median(cpu_samples[name][shape])),
                )
            )
        if name in onnx_paths:
            kind, path, size = "onnx", str(onnx_paths[name]), onnx_file_size(onnx_paths[name])
        else:
            kind, path, size = "torch", None, _param_bytes(modules[name])
        results[name] = VariantResult(name, kind, path, size, stats, memory_errors.get(name),
                                      dict(digests.get(name, {})))

    return BenchReport(
        target=target_info,
        system=system,
        baseline=baseline,
        rounds=rounds,
        variants=results,
        seconds=time.perf_counter() - started,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        load_average=[load_before, load_average()],
    )
