"""Passes of three kinds, their results, the Context they run in, and the registry recipes name them from.

- a **graph pass** takes one ModelGraph and returns a new one (pruning, fake-quant PTQ, search extraction);
- a **merge pass** takes N >= 2 ModelGraphs and returns one (fusion); it comes first in a recipe;
- an **ONNX pass** takes an ONNX file and writes a new one under ``ctx.workdir`` (ONNX Runtime's
  quantizers, NNCF).

Method packages (prune, quantize, fuse, search) import these from here, never each other. A pass whose
result must be exported in a special form (a fake-quant model lowers to QDQ ONNX) says so by returning an
``exporter`` in its PassResult; the pipeline and the Context's services then use it.

The Context gives passes and search what they share: the task and its data splits, the target and its
latency model, the seed, the reporter, a work directory, and services to export, evaluate and measure a
graph. This module sits above bench, train and models (it uses them) and below the methods.
"""

from __future__ import annotations

import itertools
import random
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from modelpress.errors import ModelpressError
from modelpress.progress import QUIET, Reporter
from modelpress.system import release_freed_memory

if TYPE_CHECKING:
    from modelpress.bench.runner import BenchReport
    from modelpress.data.sources import DataSplit, TaskData
    from modelpress.data.tasks import ReferenceOutputs, Task
    from modelpress.graph import ModelGraph
    from modelpress.targets import Target

PassKind = Literal["graph", "merge", "onnx"]
KINDS: tuple[PassKind, ...] = ("merge", "graph", "onnx")  # the order they run in


class PassConfig(BaseModel):
    """Base of every pass config: unknown keys are errors, values are type-checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Exporter(Protocol):
    """Writes ``graph`` as ONNX at ``path`` (verified against the torch model) and returns an object with
    at least ``path``; other attributes (``optimization``, ``verification``, ``kernels``...) go into the
    report. A pass returns one when its graph needs a special lowering (fake-quant -> QDQ)."""

    def __call__(self, graph: ModelGraph, path: Path, ctx: Context) -> Any: ...


@dataclass
class PassResult:
    """What a pass returns: the new graph (graph and merge passes) or the new ONNX file (ONNX passes),
    metrics for the report, and, when the graph needs a special lowering, the ``exporter`` to use."""

    graph: Any = None
    onnx_path: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    exporter: Exporter | None = None
    # causal LMs: how the graph's special layers trace into the cached decoder (export.decoder.DecoderLowering)
    decoder_lowering: Any = None


class Pass:
    """One transformation. Subclasses set ``name``, ``kind`` and ``Config`` and implement ``apply``:

    - ``kind = "graph"``: ``apply(graph, ctx)``; must not mutate the input graph (copy first);
    - ``kind = "merge"``: ``apply(graphs, ctx)`` with a list of two or more graphs, the first the anchor;
    - ``kind = "onnx"``: ``apply(onnx_path, ctx)``; writes a new file under ``ctx.workdir``.

    Every random choice uses ``ctx.seed`` (see :meth:`Context.rng`).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[PassKind] = "graph"
    Config: ClassVar[type[PassConfig]] = PassConfig

    def __init__(self, config: PassConfig | dict | None = None) -> None:
        if config is None:
            config = {}
        self.config = config if isinstance(config, PassConfig) else self.Config(**config)

    @property
    def stage(self) -> PassKind:
        """Alias of ``kind`` (the name earlier versions used)."""
        return self.kind

    def apply(self, target: Any, ctx: Context) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError


class GraphPass(Pass):
    """One ModelGraph in, one out."""

    kind: ClassVar[PassKind] = "graph"


class MergePass(Pass):
    """N >= 2 ModelGraphs in (the first is the anchor whose architecture the result keeps), one out."""

    kind: ClassVar[PassKind] = "merge"


class OnnxPass(Pass):
    """An ONNX file in, a new ONNX file out."""

    kind: ClassVar[PassKind] = "onnx"


PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {KINDS}, got {cls.kind!r}")
    PASSES[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every pass the installed plugins register (modelpress.prune, modelpress.quantize, ...)."""
    from modelpress.plugins import load_plugins

    load_plugins()
    return PASSES


# ------------------------------------------------------------------------------------------------ context


@dataclass
class Evaluation:
    """What :meth:`Context.evaluate` found: the task's metrics, the ONNX file that was scored, its export."""

    metrics: dict[str, float]
    onnx_path: Path
    export: Any = None


@dataclass
class Context:
    """Shared state and services of one run.

    task: a modelpress.data.tasks.Task; data: a modelpress.data.sources.TaskData (calibration, evaluation
    and train splits); target: a modelpress.targets.Target; reference: the original graph, which passes
    distil from and which quality is measured against; latency_model: a latency lookup table on the target
    (built by modelpress.bench for latency-aware pruning and search), or None; checkpoints: a folder for
    training checkpoints that outlives the run when it is interrupted (the CLI keeps one beside the output
    folder until the run completes, so the same command run again resumes), else ``workdir/checkpoints``.
    ``extras["artifacts"]``: name -> folder under ``workdir`` that a pass made for the user
    (prune.classwise's split); the CLI moves each into the output folder under its name.
    """

    workdir: Path
    task: Task | None = None
    data: TaskData | None = None
    target: Target | None = None
    reference: ModelGraph | None = None
    seed: int = 0
    reporter: Reporter = QUIET
    latency_model: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    checkpoints: Path | None = None
    _reference_outputs: ReferenceOutputs | None = field(default=None, repr=False)
    _counter: itertools.count = field(default_factory=itertools.count, repr=False)

    # ----- data
    @property
    def calibration(self) -> DataSplit | None:
        return None if self.data is None else self.data.calibration

    @property
    def evaluation(self) -> DataSplit | None:
        return None if self.data is None else self.data.evaluation

    @property
    def train(self) -> DataSplit | None:
        """The train split, or None when the data has none (recovery then falls back to calibration)."""
        if self.data is None:
            return None
        try:
            return getattr(self.data, "train", None)
        except ModelpressError:  # TaskData without make_train
            return None

    def checkpoint_dir(self, name: str) -> Path:
        """The folder where a pass keeps its training checkpoints under ``name`` (see ``checkpoints``)."""
        root = Path(self.checkpoints) if self.checkpoints is not None else Path(self.workdir) / "checkpoints"
        return root / name

    def rng(self, salt: str = "") -> random.Random:
        """A random generator seeded from the run's seed (and ``salt``, so passes draw independent streams)."""
        return random.Random(f"{self.seed}:{salt}")

    # ----- services
    def export(
        self,
        graph: ModelGraph,
        path: Path | str | None = None,
        *,
        exporter: Exporter | None = None,
        optimize: str = "none",
        opset: int = 17,
    ) -> Any:
        """Write ``graph`` as verified ONNX (through ``exporter`` when the graph needs a special lowering;
        otherwise the float export, ``optimize`` as in modelpress.export.export_onnx, "auto" timed on the
        target). Returns the export result (``.path``, ``.verification``...)."""
        path = Path(path) if path is not None else self._scratch("model.onnx")
        if exporter is not None:
            return exporter(graph, path, self)
        from modelpress.bench import candidate_timer
        from modelpress.export import export_onnx

        timer = candidate_timer(self.target) if optimize == "auto" and self.target is not None else None
        return export_onnx(graph.module, graph.input_spec, path, optimize=optimize, opset=opset, timer=timer,
                           reporter=self.reporter)

    def reference_outputs(self) -> ReferenceOutputs:
        """The reference (original) model's outputs on the evaluation split, computed once per Context."""
        self._require_task()
        if self.reference is None:
            raise ModelpressError("the context has no reference model to compare with", "set ctx.reference")
        if self._reference_outputs is None:
            from modelpress.data import torch_runner

            runner = torch_runner(self.reference.module, self.reference.input_spec.names)
            self._reference_outputs = self.task.reference_cache(runner, self.evaluation)
        return self._reference_outputs

    def evaluate(
        self, candidate: ModelGraph | Path | str, *, exporter: Exporter | None = None, torch_only: bool = False
    ) -> Evaluation:
        """Quality of ``candidate`` on the held-out split against the reference model.

        A graph is exported first (verified against torch; ``exporter`` for special lowerings) and the
        ONNX file is scored in ONNX Runtime, so the number is what a user deploys; an ONNX path is scored as
        it is. ``torch_only`` scores the torch module instead (no export), for quick inner loops.
        """
        self._require_task()
        reference = self.reference_outputs()
        threads = getattr(self.target, "threads", None)
        if isinstance(candidate, (str, Path)):
            from modelpress.data import onnx_runner

            path = Path(candidate)
            metrics = self.task.evaluate(onnx_runner(path, threads=threads), None, self.evaluation,
                                         reference_outputs=reference)
            release_freed_memory()  # the session's weights, freed: not left under the next step's peak
            return Evaluation(metrics, path)
        if torch_only:
            from modelpress.data import torch_runner

            runner = torch_runner(candidate.module, candidate.input_spec.names)
            metrics = self.task.evaluate(runner, None, self.evaluation, reference_outputs=reference)
            return Evaluation(metrics, Path())
        exported = self.export(candidate, exporter=exporter)
        from modelpress.data import onnx_runner

        path = Path(exported.path)
        metrics = self.task.evaluate(onnx_runner(path, threads=threads), None, self.evaluation,
                                     reference_outputs=reference)
        release_freed_memory()
        return Evaluation(metrics, path, exported)

    def measure(
        self,
        variants: ModelGraph | Path | str | Mapping[str, Any],
        *,
        baseline: str | None = None,
        **timing: Any,
    ) -> BenchReport:
        """Latency of ONNX files (or graphs, exported first) on the target, timed interleaved.

        ``variants``: one graph or file, or a name -> graph/file mapping; ``timing``: options of
        modelpress.bench.measure (rounds, batch_sizes, seq_lens, memory...)."""
        from modelpress.bench import get_target, measure

        if not isinstance(variants, Mapping):
            variants = {"model": variants}
        files = {}
        input_spec = None
        for name, v in variants.items():
            if isinstance(v, (str, Path)):
                files[name] = Path(v)
            else:
                files[name] = Path(self.export(v, self._scratch(f"{name}.onnx")).path)
                input_spec = input_spec or v.input_spec
        if input_spec is None:
            if self.reference is not None:
                input_spec = self.reference.input_spec
            else:
                from modelpress.bench import input_spec_from_onnx

                input_spec = input_spec_from_onnx(next(iter(files.values())))
        target = get_target(self.target or "ort-cpu")
        return measure(files, input_spec, target, baseline=baseline, reporter=self.reporter, **timing)

    def recover(
        self,
        graph: ModelGraph,
        *,
        steps: int,
        lr: float,
        teacher: ModelGraph | None = None,
        data: DataSplit | None = None,
        batch_size: int = 32,
        label_weight: float = 0.0,
        name: str | None = None,
        resume: bool = False,
        hidden_weight: float | None = None,
    ) -> dict[str, Any] | None:
        """Recovery fine-tuning, the one way every pass does it: distil ``teacher`` (default: the reference)
        into ``graph``'s module in place for ``steps`` (label-free unless ``label_weight`` > 0), on ``data``
        (default: the train split, else the calibration split).

        One set of defaults for every method: AdamW with weight decay 0.01, cosine schedule with
        ``min(steps // 10, 100)`` warm-up steps, gradient norm clipped to 1, the student in eval mode
        (no dropout, BatchNorm statistics frozen), seeded from the run's seed; with ``name`` training
        checkpoints go to :meth:`checkpoint_dir` (``resume``: continue from the one there). Returns a summary (steps,
        seconds, first and last loss), or None when there is nothing to learn from (no steps, task, data or
        teacher). ``hidden_weight``: hidden-state distillation of the graphs' matched blocks (0: outputs only);
        by default :data:`modelpress.train.DEFAULT_HIDDEN_WEIGHT` when distilling the reference, else 0 (another
        teacher, an ensemble, need not have the blocks the graph descends from).
        """
        from modelpress.train import DEFAULT_HIDDEN_WEIGHT, TrainConfig, hidden_pairs, train

        if hidden_weight is None:
            hidden_weight = DEFAULT_HIDDEN_WEIGHT if teacher is None else 0.0
        teacher = teacher if teacher is not None else self.reference
        split = data if data is not None else (self.train or self.calibration)
        if steps <= 0 or self.task is None or split is None or teacher is None:
            return None
        weight = hidden_weight
        pairs = hidden_pairs(graph, teacher) if weight > 0 else []
        config = TrainConfig(steps=steps, lr=lr, warmup_steps=min(steps // 10, 100), batch_size=batch_size,
                             seed=self.seed, label_weight=label_weight, dropout=False,
                             hidden_weight=weight if pairs else 0.0,
                             checkpoint_dir=self.checkpoint_dir(name) if name else None)
        result = train(graph.module, split, task=self.task, teacher=teacher.module, config=config,
                       reporter=self.reporter, input_names=list(graph.input_spec.names),
                       resume=resume and name is not None, hidden=pairs)
        graph.module.eval()
        losses = [v for _, v in result.losses]
        return {"steps": result.steps, "seconds": round(result.seconds, 2),
                "loss_start": losses[0] if losses else None, "loss_end": losses[-1] if losses else None}

    # ----- helpers
    def _require_task(self) -> None:
        if self.task is None or self.data is None or self.evaluation is None:
            raise ModelpressError("evaluating needs a task and held-out data", "give the run --data (or a Task)")

    def _scratch(self, name: str) -> Path:
        folder = Path(self.workdir) / "scratch"
        folder.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{next(self._counter):04d}-", dir=folder)) / name


def as_graph_list(graphs: Any) -> list[Any]:
    """One graph or a sequence of graphs, as a list."""
    if isinstance(graphs, Sequence) and not isinstance(graphs, (str, bytes)):
        return list(graphs)
    return [graphs]
