"""What a worker (a local process or a Ray task) runs, and the one loader of a search's evaluator.

The driver alone has the run folder. Workers get its inputs as a **payload** the executor shares once (Ray's
object store; a local pool's initializer): the spec, the saved super-network (and reference), the data split
tensors, as bytes. A worker writes them into a temporary folder of its own, rebuilds the evaluator from it once
(the same :func:`load_evaluator` the driver uses on the run folder) and returns results, and ONNX bytes when
asked: nothing it reads or writes is a path of the driver's. Below ``run`` and ``outputs``, which use it.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from modelpress.passes import Context
from modelpress.search.evaluate import EvalSettings, Evaluator
from modelpress.search.space import SearchSpace
from modelpress.search.supernet import SuperNet

SPEC = "search.json"
DATA = "data.pt"
PAYLOAD_FILES = (SPEC, DATA)
PAYLOAD_DIRS = ("supernet", "reference")
BASELINE_FILES = {"full-float": "baselines/full-float.onnx", "full-int8": "baselines/full-int8.onnx"}
_WORKER_EVALUATORS: dict[str, Evaluator] = {}


def save_data(data: Any, path: Path, *, train_samples: int = 0) -> None:
    """The calibration and evaluation splits' tensors and up to ``train_samples`` samples of the train split
    (reconstruction's extra rows; none when the data has no train split), with ``torch.save``, reloaded with
    ``weights_only``."""
    import torch

    from modelpress.errors import ModelpressError

    def split(s: Any) -> dict[str, Any]:
        return {"batches": [dict(b) for b in s.batches], "labels": None if s.labels is None else list(s.labels)}

    train = None
    if train_samples > 0:
        # as many more as the held-back calibration batch has: the train split may hold its rows, which the
        # refit leaves out
        batches = data.calibration.batches
        train_samples += len(next(iter(batches[-1].values()))) if batches else 0
        try:
            source = data.train
        except ModelpressError:  # data without a train split
            source = None
        if source is not None:
            batches, total = [], 0
            for b in source.batches:
                if total >= train_samples:
                    break
                n = min(len(next(iter(b.values()))), train_samples - total)
                batches.append({k: v[:n] for k, v in b.items()})
                total += n
            train = {"batches": batches, "labels": None}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"calibration": split(data.calibration), "evaluation": split(data.evaluation), "train": train,
                "description": data.description}, tmp)
    tmp.replace(path)


def load_data_file(path: Path) -> Any:
    import torch

    from modelpress.data.sources import DataSplit, TaskData

    d = torch.load(path, weights_only=True)
    train = d.get("train")
    return TaskData(DataSplit(**d["calibration"]), DataSplit(**d["evaluation"]), d["description"],
                    make_train=(lambda: DataSplit(**train)) if train else None)


def load_evaluator(folder: str | Path, *, workdir: Path | None = None, tables: bool = True) -> Evaluator:
    """The evaluator of a run folder (or a worker's copy of its payload): super-network, space, settings,
    data, target; with ``tables`` the latency model and precision table when the folder holds them."""
    from modelpress.bench import LatencyTable, get_target
    from modelpress.data.tasks import task_for
    from modelpress.models.saving import load_saved
    from modelpress.search.precision import PrecisionTable

    run = Path(folder)
    spec = json.loads((run / SPEC).read_text())
    graph = load_saved(run / "supernet")
    reference = load_saved(run / "reference") if (run / "reference").is_dir() else graph
    work = workdir or run / "work"
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(workdir=work, task=task_for(spec["task"]), data=load_data_file(run / DATA), reference=reference,
                  target=get_target(spec["target"]["name"], threads=spec["target"]["threads"]), seed=spec["seed"])
    table = precision = None
    if tables and (run / "latency.json").is_file():
        table = LatencyTable.load(run / "latency.json")
    if tables and (run / "precision.json").is_file():
        precision = PrecisionTable.from_dict(json.loads((run / "precision.json").read_text()))
    return Evaluator(SuperNet(graph, SearchSpace.from_dict(spec["space"])), ctx, EvalSettings(**spec["settings"]),
                     table, precision)


def make_payload(run: Path) -> dict[str, Any]:
    """The run folder's worker inputs as bytes (spec, super-network, reference, data), with a fresh id."""
    files: dict[str, bytes] = {name: (run / name).read_bytes() for name in PAYLOAD_FILES}
    for d in PAYLOAD_DIRS:
        if (run / d).is_dir():
            files.update({str(p.relative_to(run)): p.read_bytes() for p in sorted((run / d).rglob("*")) if p.is_file()})
    return {"id": uuid.uuid4().hex, "files": files}


def baseline_bytes(run: Path) -> dict[str, bytes]:
    """The full float (first) and full INT8 ONNX files the measurements time candidates against."""
    return {n: (run / rel).read_bytes() for n, rel in BASELINE_FILES.items() if (run / rel).is_file()}


def _materialize(payload: dict[str, Any]) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="modelpress-search-"))
    atexit.register(shutil.rmtree, folder, True)
    for rel, data in payload["files"].items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def worker_evaluator(payload: dict[str, Any]) -> Evaluator:
    """The evaluator of a payload, rebuilt once per process in a temporary folder of the worker's own."""
    ev = _WORKER_EVALUATORS.get(payload["id"])
    if ev is None:
        folder = _materialize(payload)
        ev = _WORKER_EVALUATORS[payload["id"]] = load_evaluator(folder, tables=False)
    return ev


def adopt_evaluator(payload: dict[str, Any], ev: Evaluator) -> None:
    """Let this process evaluate ``payload`` with ``ev`` (the driver's evaluator of the same run folder) instead
    of rebuilding it from the payload's bytes: for an executor that runs its items in the driver's process."""
    _WORKER_EVALUATORS[payload["id"]] = ev


def evaluate_item(item: tuple[dict[str, Any], bool], payload: dict[str, Any]) -> dict[str, Any]:
    """Worker entry point: (config, ONNX wanted) -> objectives it can compute, ONNX bytes, reconstruction
    seconds, and where it ran (process id, working directory)."""
    config, want_onnx = item
    ev = worker_evaluator(payload)
    before = len(ev.reconstruct_seconds)
    out = ev.evaluate(config, want_onnx=want_onnx)
    out["reconstruct_s"] = float(sum(ev.reconstruct_seconds[before:]))
    out["reconstruct_kept"] = ev.reconstruct_kept[before:] or None
    out["worker"] = {"pid": os.getpid(), "cwd": os.getcwd()}
    return out


def measure_item(item: tuple[dict[str, bytes], float | None], payload: dict[str, Any],
                 baselines: dict[str, bytes]) -> dict[str, dict[str, float]]:
    """Target-worker entry point: (name -> ONNX bytes, reference ms) -> per name its latency and speedups over
    full float and full INT8, timed interleaved with them (``Evaluator.measure_latency``)."""
    files, reference_ms = item
    ev = worker_evaluator(payload)
    folder = Path(tempfile.mkdtemp(prefix="measure-", dir=ev.ctx.workdir))
    try:
        def write(name: str, data: bytes) -> Path:
            path = folder / f"{len(list(folder.iterdir())):03d}.onnx"
            path.write_bytes(data)
            return path

        bases = {n: write(n, b) for n, b in baselines.items()}
        return ev.measure_latency({n: write(n, b) for n, b in files.items()}, bases, reference_ms)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
