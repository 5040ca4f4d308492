"""Timing ONNX files on a Target without torch: the pieces of the interleaved protocol that the local bench
runner (``modelpress.bench.runner``) and the device-side measurement agent (``modelpress.agent``) share.

It imports only numpy, onnxruntime (through :mod:`modelpress.targets`) and the standard library, because a
device running the agent has no torch. The runner adds torch variants, inputs made from an InputSpec and the
statistics of the report on top; the agent receives the inputs as arrays.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import ModelpressError
from modelpress.system import heap_allocations, release_freed_memory
from modelpress.targets import Target

Shape = tuple[int, int | None]  # (batch, sequence length or None)
Run = Callable[[Any], Any]
Track = Callable[[Iterable[Any], str], Iterator[Any]]

# The peak-memory probe: a script run in a fresh process (see its docstring). It lives beside the bench runner
# and is started by path, never imported, so neither side loads modelpress (or torch) into the probe.
MEMPROBE = Path(__file__).with_name("bench") / "_memprobe.py"


def shape_key(batch: int, seq: int | None) -> str:
    """The name of one input shape in reports and probe files: ``b8`` or ``b8_s128``."""
    return f"b{batch}" if seq is None else f"b{batch}_s{seq}"


def parse_shape_key(key: str) -> Shape:
    """The inverse of :func:`shape_key`."""
    try:
        parts = key.split("_")
        batch = int(parts[0].removeprefix("b"))
        seq = int(parts[1].removeprefix("s")) if len(parts) > 1 else None
    except (ValueError, IndexError):
        raise ModelpressError(f"bad shape name {key!r}", "shapes are named like b1 or b8_s128") from None
    return batch, seq


def onnx_runner(path: Path, target: Target, name: str) -> Run:
    """A fresh session of ``path`` on ``target`` as a function of one feed (a dict with at least its inputs)."""
    try:
        sess = target.session(path)
    except ModelpressError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelpressError(f"ONNX Runtime cannot load variant {name!r} ({Path(path).name}): {exc}") from exc
    wanted = [i.name for i in sess.get_inputs()]
    return lambda feed: sess.run(None, {k: feed[k] for k in wanted})


def time_runs(
    run: Run,
    feed: Any,
    warmup: int,
    runs: int,
    min_time_s: float,
    max_time_s: float,
    max_runs: int,
) -> tuple[list[float], list[float]]:
    """Warm up, then time at least ``runs`` runs for at least ``min_time_s`` (at most ``max_time_s``).

    Returns wall-clock and process CPU milliseconds per run.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        run(feed)
        if time.perf_counter() - start > max_time_s:
            break
    times: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs:
        elapsed = time.perf_counter() - start
        if times and elapsed >= max_time_s:
            break
        if len(times) >= runs and elapsed >= min_time_s:
            break
        c0, t0 = time.process_time(), time.perf_counter()
        run(feed)
        t1, c1 = time.perf_counter(), time.process_time()
        times.append((t1 - t0) * 1000.0)
        cpu.append((c1 - c0) * 1000.0)
    return times, cpu


def _no_track(items: Iterable[Any], _description: str) -> Iterator[Any]:
    yield from items


def interleave(
    names: Sequence[str],
    make_run: Callable[[str], Run],
    feeds_of: Callable[[str], Mapping[Shape, Any]],
    shapes: Sequence[Shape],
    *,
    rounds: int,
    warmup: int,
    runs: int,
    min_time_s: float,
    max_time_s: float,
    max_runs: int,
    track: Track = _no_track,
) -> tuple[dict[str, dict[Shape, list[list[float]]]], dict[str, dict[Shape, list[float]]]]:
    """Time the variants round-robin for ``rounds`` rounds, the order rotating every round; each round builds
    a fresh runner per variant (``make_run``) and times every shape. Returns per variant and shape the wall
    milliseconds of each round's runs, and the CPU milliseconds of all runs."""
    samples: dict[str, dict[Shape, list[list[float]]]] = {n: {s: [] for s in shapes} for n in names}
    cpu_samples: dict[str, dict[Shape, list[float]]] = {n: {s: [] for s in shapes} for n in names}
    jobs = [(r, names[(r + i) % len(names)]) for r in range(rounds) for i in range(len(names))]
    for _, name in track(jobs, f"timing {len(names)} variants x {rounds} rounds"):
        run = make_run(name)
        feeds = feeds_of(name)
        for shape in shapes:
            with heap_allocations():  # no page faults per allocation in the timed loop
                wall, cpu = time_runs(run, feeds[shape], warmup, runs, min_time_s, max_time_s, max_runs)
            samples[name][shape].append(wall)
            cpu_samples[name][shape].extend(cpu)
        del run
        release_freed_memory()  # the session's freed weights, before the next variant's session stacks on them
    return samples, cpu_samples


def probe_onnx_memory(
    path: Path, target: Target, feeds: Mapping[Shape, Mapping[str, np.ndarray]], shapes: Sequence[Shape],
    workdir: Path,
) -> dict[str, float | None]:
    """Peak resident MiB above a baseline of one session of ``path`` per shape, in a fresh process."""
    inputs = workdir / "inputs.npz"
    if not inputs.exists():
        arrays = {f"{shape_key(*shape)}::{k}": v for shape in shapes for k, v in feeds[shape].items()}
        np.savez(inputs, **arrays)
    cfg = {
        "path": str(path),
        "providers": list(target.providers),
        "provider_options": [dict(o) for o in target.provider_options],
        "threads": target.threads,
        "session_config": [list(kv) for kv in target.session_config],
        "inputs": str(inputs),
        "shapes": [shape_key(*s) for s in shapes],
    }
    proc = subprocess.run(
        [sys.executable, str(MEMPROBE), json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            (proc.stderr or proc.stdout).strip().splitlines()[-1:] or f"exit {proc.returncode}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])["shapes"]


def output_digest(outputs: Sequence[Any]) -> str:
    """SHA-256 over a run's outputs (dtype, shape and bytes of each, in order): equal digests mean
    bit-identical outputs, so a device's result can be checked against a local run."""
    h = hashlib.sha256()
    for out in outputs:
        a = np.ascontiguousarray(np.asarray(out))
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def onnx_digests(path: Path, target: Target, feeds: Mapping[Shape, Mapping[str, np.ndarray]],
                 name: str = "model") -> dict[str, str]:
    """The output digest of ``path`` on ``target`` for each shape's feed (one fresh session)."""
    run = onnx_runner(path, target, name)
    return {shape_key(*shape): output_digest(run(feed)) for shape, feed in feeds.items()}
