"""Passes (graph, ONNX and merge kinds), their results, the Context they run in, and the registry recipes
name them from. Method packages (prune, quantize, fuse, search) import these from here, never each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from modelpress.progress import QUIET, Reporter


class PassConfig(BaseModel):
    """Base of every pass config: unknown keys are errors, values are type-checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class PassResult:
    """What a pass returns: the new graph (graph stage) or the new ONNX file (onnx stage), plus metrics."""

    graph: Any = None  # ModelGraph for graph-stage passes
    onnx_path: Path | None = None  # for onnx-stage passes
    metrics: dict[str, Any] = field(default_factory=dict)


class Pass:
    """One transformation. Subclasses set ``name``, ``stage`` ("graph" or "onnx") and ``Config``.

    Graph-stage passes get ``apply(graph, ctx)`` and must not mutate the input graph (copy first);
    onnx-stage passes get ``apply(onnx_path, ctx)`` and write a new file under ``ctx.workdir``.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "graph"
    Config: ClassVar[type[PassConfig]] = PassConfig

    def __init__(self, config: PassConfig | dict | None = None) -> None:
        if config is None:
            config = {}
        self.config = config if isinstance(config, PassConfig) else self.Config(**config)

    def apply(self, target: Any, ctx: Any) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError


PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    PASSES[cls.name] = cls
    return cls


@dataclass
class Context:
    """Shared state of one pipeline run.

    task: a modelpress.data.tasks.Task; data: a modelpress.data.sources.TaskData (calibration and
    evaluation splits); target: a modelpress.targets.Target; reference: the original graph,
    for passes that distil from or compare against it.
    """

    workdir: Path
    task: Any = None
    data: Any = None
    target: Any = None
    reference: Any = None
    seed: int = 0
    reporter: Reporter = QUIET
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def calibration(self) -> Any:
        return None if self.data is None else self.data.calibration

    @property
    def evaluation(self) -> Any:
        return None if self.data is None else self.data.evaluation
