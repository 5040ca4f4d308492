"""Targets: where latency is measured (execution providers, threads, the shapes that matter)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from modelpress.errors import ModelpressError


def cpu_count() -> int:
    """Cores this process may run on (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


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

    @property
    def provider(self) -> str:
        """The provider this target measures (the first of ``providers``)."""
        return self.providers[0]

    @property
    def device(self) -> str:
        """ "cpu" or "cuda": where inputs live and where torch variants run."""
        return "cpu" if self.provider == "CPUExecutionProvider" else "cuda"

    def available(self) -> bool:
        """Whether the installed ONNX Runtime offers this target's provider."""
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

    def session_options(self):  # noqa: ANN201 - onnxruntime.SessionOptions
        """SessionOptions for measuring on this target: its threads, ORT_ENABLE_ALL, its config entries."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        for key, value in self.session_config:
            so.add_session_config_entry(key, value)
        return so

    def session(self, path: os.PathLike | str):  # noqa: ANN201 - onnxruntime.InferenceSession
        """A fresh InferenceSession for ``path`` on this target."""
        import onnxruntime as ort

        self.require_available()
        kwargs: dict[str, Any] = {"providers": list(self.providers)}
        if self.provider_options:
            kwargs["provider_options"] = [dict(o) for o in self.provider_options]
        return ort.InferenceSession(str(path), self.session_options(), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
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


def get_target(name: str | Target, threads: int | None = None) -> Target:
    """The target called ``name`` (optionally with another thread count)."""
    if isinstance(name, Target):
        return name.with_threads(threads)
    try:
        target = TARGETS[name]
    except KeyError:
        raise ModelpressError(
            f"unknown target {name!r}",
            f"use one of: {', '.join(list_targets())}",
        ) from None
    return target.with_threads(threads)
