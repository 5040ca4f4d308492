"""System facts a measurement depends on: usable cores, CPU model and instruction sets, library versions;
and handing freed memory back to the operating system."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import sys
from collections.abc import Iterable, Iterator
from importlib import metadata
from typing import Any

CPU_FLAGS_OF_INTEREST = (
    "sse4_2",
    "fma",
    "f16c",
    "avx",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
)


def cpu_count() -> int:
    """Cores this process may run on (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_info() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and value.strip():
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _torch_threads() -> int | None:
    """torch's thread count when torch is loaded (never imported here: the measurement agent has none)."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.get_num_threads()


def system_info(threads: int | None = None) -> dict[str, Any]:
    """The machine and library versions a measurement depends on (CPU model and instruction sets first)."""
    model, flags = _cpu_info()
    present = [f for f in CPU_FLAGS_OF_INTEREST if f in flags]
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        providers = []
    return {
        "cpu_model": model,
        "cpu_flags": present,
        "vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
        "avx512": "avx512f" in flags,
        "amx": "amx_int8" in flags or "amx_tile" in flags,
        "cores_logical": os.cpu_count(),
        "cores_available": cpu_count(),
        "threads": threads if threads is not None else cpu_count(),
        "torch_threads": _torch_threads(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in ("torch", "onnxruntime", "onnx", "transformers", "numpy", "onnxslim", "optimum")
        },
        "ort_providers": providers,
        "load_average_1min": load_average(),
    }


_TRIM: Any = None  # glibc's malloc_trim, False where there is none


def release_freed_memory(*, collect: bool = True) -> bool:
    """Collect Python's unreachable reference cycles (a dry run's or a trace's cut module copies: 240 MiB of
    BERT-base's saliency step waited for the collector, measured; ``collect=False`` skips it where a step makes
    no cycles), then hand the heap memory this process freed back to the operating system (glibc's
    ``malloc_trim``; a no-op returning False elsewhere).

    glibc serves allocations below its dynamic mmap threshold (which grows to 32 MiB once such a block is
    freed) from the heap, and freed blocks in the middle of it stay resident: after a step that allocates
    and frees a model's worth of tensors (a dry run's cut copies of every weight), the resident set keeps
    them and the next step's peak stacks on top (2 GiB on a 1B-parameter model). Cheap: call it after such
    steps."""
    global _TRIM
    if collect:
        gc.collect()
    if _TRIM is None:
        _TRIM = False
        if platform.system() == "Linux":
            try:
                import ctypes

                _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                _TRIM = False
    return bool(_TRIM and _TRIM(0))


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# from this size up, blocks are mapped on their own and unmapped when freed: BERT-base's matrices (2.25 MiB and
# 9 MiB) and activations are above it; 4 MiB left the 2.25 MiB ones on the heap (QDQ export's trace: +550 MiB
# resident against +160 MiB at 1 MiB, a one-off measurement; benchmarks/qdq_memory.py compares 1 MiB with glibc's default)
_LARGE_BLOCK = 1 << 20
_DYNAMIC_CEILING = 32 << 20  # where glibc's dynamic threshold ends up on 64-bit after freeing large blocks
_threshold: int | None = None  # what this process set (None: glibc's dynamic default)


def _mallopt() -> Any:
    if platform.system() != "Linux":
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def _set_threshold(value: int | None) -> bool:
    global _threshold
    mallopt = _mallopt()
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_CEILING if value is None else value):
        return False
    _threshold = value
    return True


def unmap_large_blocks(threshold: int = _LARGE_BLOCK) -> bool:
    """From now on, in this process, blocks of ``threshold`` bytes and more get their own mapping, returned to
    the system when freed (glibc's ``M_MMAP_THRESHOLD``, fixed; returns False and changes nothing elsewhere).

    glibc raises its mmap threshold to 32 MiB once a large block is freed; after that every tensor below 32
    MiB comes from the heap and, freed, stays resident, so each step's peak stacks on the freed tensors of
    the steps before. Measured on a random-weight BERT-base (418 MiB of weights): torch's trace of the QDQ
    export kept 1.1 GiB resident with the dynamic threshold and 160 MiB at 1 MiB. The ``modelpress``
    command sets it at start (``MODELPRESS_MALLOC=default`` keeps glibc's behaviour). Mapping costs page
    faults on each large allocation; timed inference runs under :func:`heap_allocations`."""
    return _set_threshold(threshold)


def apply_malloc_setting() -> bool:
    """The modelpress command's setting, for it and the child processes it starts: :func:`unmap_large_blocks`
    unless the environment says ``MODELPRESS_MALLOC=default`` (glibc's own behaviour). Returns whether set."""
    if os.environ.get("MODELPRESS_MALLOC", "").lower() == "default":
        return False
    return unmap_large_blocks()


@contextlib.contextmanager
def large_blocks_unmapped() -> Iterator[bool]:
    """While inside, blocks of 1 MiB and more get their own mapping (:func:`unmap_large_blocks`); on exit the
    process's earlier setting comes back and the freed heap is trimmed. Yields False (and changes nothing)
    where glibc's ``mallopt`` is not available. On BERT-base the saliency backward kept 330 MiB resident
    without it against 215 MiB with it (at 4 MiB)."""
    before = _threshold
    if not _set_threshold(_LARGE_BLOCK if before is None else min(before, _LARGE_BLOCK)):
        yield False
        return
    try:
        yield True
    finally:
        release_freed_memory()
        _set_threshold(before)


@contextlib.contextmanager
def heap_allocations() -> Iterator[None]:
    """While inside, glibc serves blocks below 32 MiB from its heap (no page faults per allocation: what a
    timed inference loop should see); on exit the process's earlier setting comes back, after a trim."""
    before = _threshold
    changed = before is not None and _set_threshold(None)
    try:
        yield
    finally:
        if changed:
            release_freed_memory(collect=False)  # an inference loop makes no reference cycles
            _set_threshold(before)


_frozen = False


def freeze_loaded_code(modules: Iterable[str] = ()) -> bool:
    """Once per process: import ``modules`` (those installed), collect, then move every object alive into the
    collector's permanent generation (``gc.freeze``), so the full collections that :func:`release_freed_memory`
    runs after memory-heavy steps no longer scan the imported libraries' objects, which live as long as the
    process. Measured in `modelpress quantize` on MiniLM: 80 collections took 17 s of its 72 s, 0.1 s of
    each spent on the imports' 220 000 objects alone. Call it before loading models: what is alive now is
    never collected later. Returns whether this call froze."""
    global _frozen
    if _frozen:
        return False
    import importlib
    import importlib.util

    for name in modules:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    gc.collect()
    gc.freeze()
    _frozen = True
    return True


def available_memory() -> int | None:
    """Bytes of memory the system can still give (``MemAvailable`` of /proc/meminfo); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_MADV_DONTNEED = 4  # Linux madvise advice


def _file_mappings(table: str = "/proc/self/smaps") -> list[tuple[int, int]]:
    """Sorted (start, end) addresses of this process's mappings backed by a file on disk (not anonymous memory,
    not the heap or stack) that hold no written page: a written page of a private file mapping is an anonymous
    copy (smaps' ``Anonymous``), and dropping it would bring the file's bytes back in its place. With
    ``table="/proc/self/maps"`` written pages are not looked at: 25x cheaper (smaps walks every page table),
    enough to tell whether any range lies in a file mapping at all."""
    spans = []
    current: tuple[int, int] | None = None
    with open(table) as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:  # a mapping's header line
                current = None
                if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/"):  # inode 0: anonymous
                    start, end = parts[0].split("-")
                    current = (int(start, 16), int(end, 16))
                    spans.append(current)
            elif current is not None and parts[0] == "Anonymous:" and int(parts[1]) > 0:
                spans.remove(current)  # written to since it was mapped: left alone
                current = None
    return sorted(spans)


def _inside(spans: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges that lie wholly inside one of ``spans`` (sorted (start, end) pairs)."""
    import bisect

    starts = [s for s, _ in spans]
    kept = []
    for address, size in ranges:
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and address + size <= spans[i][1]:
            kept.append((address, size))
    return kept


_frozen_mappings: list[tuple[int, int]] | None = None  # see file_mappings_frozen


@contextlib.contextmanager
def file_mappings_frozen() -> Iterator[None]:
    """While inside, :func:`drop_file_pages` reads this process's file mappings (and their written pages) once,
    at entry, instead of on every call: for loops that drop after every block (a refit's forwards, hundreds of
    calls; reading /proc/self/smaps costs 10-20 ms a time in a process with thousands of mappings). Inside, no
    file may be newly mapped for dropping and no mapped weight written in place (a refit puts new storage in)."""
    global _frozen_mappings
    if _frozen_mappings is not None or platform.system() != "Linux":  # nested, or nothing to read
        yield
        return
    try:
        _frozen_mappings = _file_mappings()
    except OSError:
        _frozen_mappings = []
    try:
        yield
    finally:
        _frozen_mappings = None


def file_backed(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges ((address, bytes) pairs) that lie wholly inside a file mapping with no written page, those
    :func:`drop_file_pages` would drop ([] off Linux)."""
    if platform.system() != "Linux":
        return []
    try:
        if _frozen_mappings is not None:
            return _inside(_frozen_mappings, list(ranges))
        candidates = _inside(_file_mappings("/proc/self/maps"), list(ranges))
        return _inside(_file_mappings(), candidates) if candidates else []
    except OSError:
        return []


def drop_file_pages(ranges: Iterable[tuple[int, int]]) -> int:
    """Drop from this process's resident set the whole pages of ``ranges`` ((address, bytes) pairs) that lie
    inside a mapping of a file; other ranges are left alone. Returns the bytes advised away (0 off Linux).

    A later read of such a page faults it back in from the file (usually still in the page cache), so the
    memory reads the same afterwards. A mapping with any page written since it was mapped (a private mapping's
    written page is an anonymous copy, which dropping would replace with the file's bytes) is left alone
    whole, so weights changed in place through ``.data`` (which no tensor version counts) are never lost. A run
    that has read every weight of the original (its export, a pass's saliency) otherwise keeps a full copy of
    them resident to its end."""
    # maps first (cheap): weights in ordinary memory, the common case, never read smaps (called after every
    # block of a refit's forwards, where smaps' page-table walk cost minutes over a test suite)
    candidates = file_backed(ranges)
    if not candidates:
        return 0
    try:
        import ctypes

        madvise = ctypes.CDLL("libc.so.6").madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGE_SIZE")
    dropped = 0
    for address, size in candidates:
        first = -(-address // page) * page
        last = (address + size) // page * page
        if last > first and madvise(first, last - first, _MADV_DONTNEED) == 0:
            dropped += last - first
    return dropped
