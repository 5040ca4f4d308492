"""Targets: where a model runs and is measured (execution providers, threads, the shapes that matter).

The bottom layer owns them so that every ONNX Runtime session in the toolkit (export verification,
evaluation runners, latency measurement) is built by one factory, :meth:`Target.session`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.errors import ModelpressError
from modelpress.system import cpu_count


@dataclass(frozen=True)
class Target:
    """Where and how a model is measured.

    ``providers`` is the ONNX Runtime provider list in priority order (the first is the one the
    target is about; later ones are fallbacks for nodes it cannot run). ``threads`` sets ONNX Runtime's
    intra-op threads (and torch's, for torch variants).
    """

    name: str
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 1
    batch_sizes: tuple[int, ...] = (1,)
    seq_lens: tuple[int, ...] = (128,)
    description: str = ""
    provider_options: tuple[dict[str, Any], ...] = field(default=())
    # ONNX Runtime session config entries, e.g. (("session.intra_op.allow_spinning", "0"),): turning
    # spinning off helps a lot on an oversubscribed machine (2 threads on 2 busy cores ran 2x slower).
    session_config: tuple[tuple[str, str], ...] = ()
    # A device running `modelpress agent` (``http://HOST:PORT`` or ``https://...``): measurements run there,
    # through modelpress.bench.remote, with the same interleaved protocol, on the providers the agent was
    # started with (its --providers). ``threads`` 0 means the device's own default (the agent's --threads).
    address: str | None = None

    @property
    def remote(self) -> bool:
        """Whether this target is a device reached through its measurement agent."""
        return self.address is not None

    @property
    def provider(self) -> str:
        """The provider this target measures (the first of ``providers``)."""
        return self.providers[0]

    @property
    def device(self) -> str:
        """ "cpu" or "cuda": where inputs live and where torch variants run."""
        return "cpu" if self.provider == "CPUExecutionProvider" else "cuda"

    def available(self) -> bool:
        """Whether the installed ONNX Runtime offers this target's provider (a remote target: True; its
        device says what it offers when it is first asked to measure)."""
        if self.remote:
            return True
        import onnxruntime as ort

        return self.provider in ort.get_available_providers()

    def require_available(self) -> None:
        """Raise ModelpressError when this target cannot run here."""
        if not self.available():
            import onnxruntime as ort

            raise ModelpressError(
                f"target {self.name!r} needs {self.provider}, which this ONNX Runtime does not offer "
                f"(available: {', '.join(ort.get_available_providers())})",
                "install onnxruntime-gpu (and TensorRT for 'tensorrt') on a machine with a GPU, "
                "or use the 'ort-cpu' target",
            )

    def _local_only(self, what: str) -> None:
        if self.remote:
            raise ModelpressError(
                f"{what} runs in this process, not on the device {self.name}",
                "measure on the device with modelpress.bench.measure (the agent times ONNX files there)",
            )

    def with_threads(self, threads: int | None) -> Target:
        """A copy with another thread count (None keeps this one)."""
        if threads is None:
            return self
        if threads < 1:
            raise ModelpressError(f"threads must be at least 1, got {threads}")
        return dataclasses.replace(self, threads=int(threads))

    def with_session_config(self, **entries: str) -> Target:
        """A copy with extra ONNX Runtime session config entries (keys with dots: pass a dict with **)."""
        merged = dict(self.session_config)
        merged.update({k: str(v) for k, v in entries.items()})
        return dataclasses.replace(self, session_config=tuple(sorted(merged.items())))

    def session_options(self, *, level: str = "all", optimized_path: os.PathLike | str | None = None):  # noqa: ANN201
        """SessionOptions for this target: its threads, graph optimization ``level`` ("all", "extended",
        "basic" or "none"), its config entries; ``optimized_path`` saves the optimized graph there."""
        import onnxruntime as ort

        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = levels[level]
        so.log_severity_level = 3
        if optimized_path is not None:
            so.optimized_model_filepath = str(optimized_path)
        for key, value in self.session_config:
            so.add_session_config_entry(key, value)
        return so

    def session(
        self, path: os.PathLike | str, *, level: str = "all", optimized_path: os.PathLike | str | None = None
    ):  # noqa: ANN201 - onnxruntime.InferenceSession
        """A fresh InferenceSession for ``path`` on this target: the one place sessions are built."""
        self._local_only("an ONNX Runtime session")
        self.require_available()
        return self.session_with_options(path, self.session_options(level=level, optimized_path=optimized_path))

    def node_times(self, path: os.PathLike | str, feeds: dict[str, Any], runs: int = 10) -> dict[str, float]:
        """Median milliseconds per run of each node of ``path``'s optimized graph on this target (ONNX
        Runtime's profiler, after two warm-up runs): where a model spends its time, node by node. A remote
        target profiles on its device (through the client modelpress.bench.remote registers)."""
        import json
        import tempfile

        import numpy as np

        if self.remote:
            if _REMOTE_PROFILER is None:
                raise ModelpressError(f"no client for the device {self.name} is loaded", "import modelpress.bench")
            return _REMOTE_PROFILER(self, path, feeds, runs)
        with tempfile.TemporaryDirectory(prefix="modelpress-profile-") as tmp:
            so = self.session_options()
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / "profile")
            session = self.session_with_options(path, so)
            for _ in range(2):
                session.run(None, feeds)
            for _ in range(runs):
                session.run(None, feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
        per_run: dict[str, list[float]] = {}
        runs_seen = 0
        for e in events:
            if e.get("cat") == "Session" and e.get("name") == "model_run":
                runs_seen += 1
            elif e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and runs_seen >= 2:
                per_run.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1000.0)
        return {name: float(np.median(v)) for name, v in per_run.items()}

    def session_with_options(self, path: os.PathLike | str, options: Any):  # noqa: ANN201
        """An InferenceSession for ``path`` with these SessionOptions on this target's providers."""
        import onnxruntime as ort

        self._local_only("an ONNX Runtime session")
        self.require_available()
        kwargs: dict[str, Any] = {"providers": list(self.providers)}
        if self.provider_options:
            kwargs["provider_options"] = [dict(o) for o in self.provider_options]
        return ort.InferenceSession(str(path), options, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The target as JSON (a remote target adds its address)."""
        return {
            **({"address": self.address} if self.remote else {}),
            "name": self.name,
            "providers": list(self.providers),
            "threads": self.threads,
            "batch_sizes": list(self.batch_sizes),
            "seq_lens": list(self.seq_lens),
            "description": self.description,
            "session_config": dict(self.session_config),
        }


def _registry() -> dict[str, Target]:
    cores = cpu_count()
    return {
        "ort-cpu": Target(
            name="ort-cpu",
            providers=("CPUExecutionProvider",),
            threads=cores,
            batch_sizes=(1, 8),
            seq_lens=(128,),
            description=f"ONNX Runtime on the CPU, all {cores} cores",
        ),
        "edge": Target(
            name="edge",
            providers=("CPUExecutionProvider",),
            threads=1,
            batch_sizes=(1,),
            seq_lens=(128,),
            description="a small device: ONNX Runtime on one CPU thread, batch 1",
        ),
        "ort-cuda": Target(
            name="ort-cuda",
            providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
            threads=1,
            batch_sizes=(1, 8, 32),
            seq_lens=(128,),
            description="ONNX Runtime's CUDA provider (needs onnxruntime-gpu and a GPU)",
        ),
        "tensorrt": Target(
            name="tensorrt",
            providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
            threads=1,
            batch_sizes=(1, 8, 32),
            seq_lens=(128,),
            description="ONNX Runtime's TensorRT provider (needs onnxruntime-gpu, TensorRT and a GPU)",
        ),
    }


TARGETS: dict[str, Target] = _registry()


def list_targets() -> list[str]:
    """Names of the known targets."""
    return sorted(TARGETS)


def cpu_session(path: os.PathLike | str, threads: int | None = None, **kwargs: Any):  # noqa: ANN201
    """An ONNX Runtime CPU session (the ``ort-cpu`` target, all usable cores unless ``threads``)."""
    return get_target("ort-cpu", threads).session(path, **kwargs)


# The remote client (modelpress.bench.remote, a layer above) registers how a device profiles a model here:
# (target, path, feeds, runs) -> node times.
_REMOTE_PROFILER: Any = None


def set_remote_profiler(profiler: Any) -> None:
    """Register the function that runs :meth:`Target.node_times` on a device (called by the remote client)."""
    global _REMOTE_PROFILER
    _REMOTE_PROFILER = profiler


REMOTE_PREFIX = "remote:"
_REMOTE_HINT = "write remote:HOST:PORT (e.g. remote:127.0.0.1:8765), or remote:https://HOST:PORT for TLS"


def remote_target(spec: str) -> Target:
    """The Target of a device running ``modelpress agent``: ``remote:HOST:PORT``, ``remote:[IPv6]:PORT``
    or ``remote:https://HOST:PORT`` (http unless https is written). No connection is made here."""
    from urllib.parse import urlsplit

    rest = spec[len(REMOTE_PREFIX):] if spec.startswith(REMOTE_PREFIX) else spec
    url = rest if "://" in rest else f"http://{rest}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ModelpressError(f"target {spec!r} is not a device address", _REMOTE_HINT) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ModelpressError(f"target {spec!r} is not a device address", _REMOTE_HINT)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    address = f"{parts.scheme}://{host}:{port}"
    shown = f"{host}:{port}" if parts.scheme == "http" else address
    return Target(
        name=f"{REMOTE_PREFIX}{shown}",
        providers=("CPUExecutionProvider",),
        threads=0,
        batch_sizes=(1, 8),
        seq_lens=(128,),
        description=f"a device running `modelpress agent` at {address}",
        address=address,
    )


def get_target(name: str | Target, threads: int | None = None) -> Target:
    """The target called ``name`` (optionally with another thread count); ``remote:HOST:PORT`` is a device
    running ``modelpress agent`` (see :func:`remote_target`)."""
    if isinstance(name, Target):
        return name.with_threads(threads)
    if name.startswith(REMOTE_PREFIX):
        return remote_target(name).with_threads(threads)
    try:
        target = TARGETS[name]
    except KeyError:
        raise ModelpressError(
            f"unknown target {name!r}",
            f"use one of: {', '.join(list_targets())}, or remote:HOST:PORT (a device running `modelpress agent`)",
        ) from None
    return target.with_threads(threads)
