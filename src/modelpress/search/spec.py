"""What one search is asked to do: a frozen, JSON-ready spec (written into the run folder once, never changed
while the search runs). Runtime objects (the model, its data, a prebuilt latency table) are ``run_search``'s
arguments, not part of the spec."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from modelpress.errors import ModelpressError
from modelpress.search.evaluate import RECONSTRUCT_TARGETS, check_latency_mode, check_objectives
from modelpress.search.executors import check_executor
from modelpress.search.linas import check_budget

__all__ = ["SearchSpec"]


@dataclass(frozen=True)
class SearchSpec:
    """A search: objectives and budget, how latency is obtained, the space, the super-network, the loop and
    where evaluations run.

    ``latency``: ``measured`` (every candidate timed on the target, interleaved with full float and full INT8)
    or ``predicted`` (the block latency table and the measured precision table steer the loop; the reported
    front is then measured, unless ``measure_front`` is off: a predicted-only run, which its outputs say).
    ``latency_batch`` / ``latency_seq``: the shape latency is timed at (default: the latency table's, else
    batch 1 and the target's first sequence length). ``space``: ``SearchSpace.from_graph`` options.
    ``finetune``: TrainConfig fields of the InstaTune fine-tuning (None: the pretrained weights as they are;
    ``n_random`` random sub-networks per step). ``reconstruct``: refit every extracted sub-network's readers
    of removed units before it is scored, on the calibration split (but its last batch, held back to check the
    refit) plus up to ``reconstruct_samples`` train-split samples, as the prune passes do;
    ``reconstruct_target``: ``stream`` (a residual writer refits to the original stream's value) or ``layer``. ``uniform``: the uniform-width anchors.
    ``rounds``: interleaved rounds of every latency measurement."""

    objectives: tuple[str, ...] = ("quality", "latency")
    budget: int = 32
    batch_size: int = 8
    latency: str = "measured"
    latency_batch: int | None = None
    latency_seq: int | None = None
    latency_grid: str | None = None
    measure_front: bool = True
    rounds: int = 3
    space: dict[str, Any] = field(default_factory=dict)
    saliency: str = "magnitude"
    finetune: dict[str, Any] | None = None
    reconstruct: bool = True
    reconstruct_target: str = "stream"
    reconstruct_samples: int = 512
    precision_config: dict[str, Any] | None = None
    uniform: tuple[float, ...] = (0.25, 0.5, 0.75)
    generations: int = 40
    pop_size: int = 48
    executor: str = "local"
    workers: int = 1
    ray_address: str | None = None
    target_resource: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objectives", tuple(self.objectives))
        object.__setattr__(self, "uniform", tuple(float(u) for u in self.uniform))

    def check(self) -> None:
        """Everything that can be refused before any work (a dead Ray address included)."""
        check_objectives(list(self.objectives))
        check_latency_mode(self.latency)
        check_budget(self.budget, self.batch_size)
        if self.reconstruct_target not in RECONSTRUCT_TARGETS:
            raise ModelpressError(f"unknown reconstruction target {self.reconstruct_target!r}",
                                  f"choose {' or '.join(RECONSTRUCT_TARGETS)}")
        if self.reconstruct_samples < 0:
            raise ModelpressError(f"reconstruct_samples must be at least 0, got {self.reconstruct_samples}")
        if self.rounds < 1:
            raise ModelpressError(f"rounds must be at least 1, got {self.rounds}")
        if self.latency_batch is not None and self.latency_batch < 1:
            raise ModelpressError(f"latency batch {self.latency_batch} is not positive", "give a positive batch")
        check_executor(self.executor, self.ray_address)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the saved one (the loop's own settings are LINAS' fingerprint;
        where evaluations run and how many rounds time them may change)."""
        keep = ("objectives", "latency", "latency_batch", "latency_seq", "latency_grid", "space", "saliency",
                "finetune", "reconstruct", "reconstruct_target", "reconstruct_samples", "precision_config", "uniform")
        d = asdict(self)
        return {k: _jsonable(d[k]) for k in keep}

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
