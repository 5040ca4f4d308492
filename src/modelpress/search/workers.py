"""What a worker (a local process or a Ray task) runs: the evaluator of a run folder, rebuilt once per process
from what the folder holds (``search.json``, the saved super-network, the latency model), and the two entry
points the executors call with a run folder's path. Below ``run`` and ``outputs``, which both use it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from modelpress.passes import Context
from modelpress.search.evaluate import EvalSettings, Evaluator
from modelpress.search.space import SearchSpace
from modelpress.search.supernet import SuperNet

SPEC = "search.json"
_EVALUATORS: dict[str, Evaluator] = {}


def load_evaluator(run_dir: str | Path) -> Evaluator:
    """The evaluator of a run folder (rebuilt once per process)."""
    key = str(Path(run_dir).resolve())
    if key in _EVALUATORS:
        return _EVALUATORS[key]
    from modelpress.bench import LatencyTable, get_target
    from modelpress.data import load_data
    from modelpress.data.tasks import task_for
    from modelpress.models.saving import load_saved

    run = Path(key)
    spec = json.loads((run / SPEC).read_text())
    graph = load_saved(run / "supernet")
    reference = load_saved(run / "reference") if (run / "reference").is_dir() else graph
    space = SearchSpace.from_dict(spec["space"])
    d = spec["data"]
    data = load_data(d["spec"], graph.input_spec, graph.tokenizer, batch_size=d["batch_size"],
                     n_calibration=d["n_calibration"], n_evaluation=d["n_evaluation"], seed=spec["seed"])
    work = run / "work" / str(os.getpid())
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(workdir=work, task=task_for(spec["task"]), data=data, reference=reference,
                  target=get_target(spec["target"]["name"], threads=spec["target"]["threads"]), seed=spec["seed"])
    table = LatencyTable.load(run / "latency.json") if (run / "latency.json").is_file() else None
    ev = Evaluator(SuperNet(graph, space), ctx, EvalSettings(**spec["settings"]), table)
    _EVALUATORS[key] = ev
    return ev


def evaluate_item(item: tuple[str, dict[str, Any], str | None]) -> dict[str, Any]:
    """Worker entry point: (run folder, config, ONNX path or None) -> evaluation."""
    import torch

    torch.set_num_threads(1)
    run_dir, config, onnx = item
    return load_evaluator(run_dir).evaluate(config, None if onnx is None else Path(onnx))


def measure_item(item: tuple[str, dict[str, str], float | None]) -> dict[str, float]:
    """Target-worker entry point: (run folder, name -> ONNX, baseline reference ms) -> latencies."""
    run_dir, onnx, baseline_ms = item
    ev = load_evaluator(run_dir)
    return ev.measure_latency(onnx, str(Path(run_dir) / "baselines" / "full-float.onnx"), baseline_ms)
