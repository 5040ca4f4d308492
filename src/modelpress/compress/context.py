"""Context: everything a pass may need besides the graph (task, data, target, seed, reporter, work dir)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.compress.reporter import QUIET, Reporter


@dataclass
class Context:
    """Shared state of one pipeline run.

    task: a modelpress.data.tasks.Task; data: a modelpress.data.sources.TaskData (calibration and
    evaluation splits); target: a modelpress.bench.targets.Target; reference: the original graph,
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
