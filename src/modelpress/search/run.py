"""One search run. The run folder lives on the driver only; it holds everything needed to resume the search
or to extract a point:

    RUN_DIR/search.json       the spec (SearchSpec), model fingerprint, space, evaluation settings: written once
    RUN_DIR/supernet/         the (re-ordered, optionally fine-tuned) super-network, saved without pickle
    RUN_DIR/reference/        the original model when the super-network was fine-tuned (quality reference)
    RUN_DIR/data.pt           the calibration and evaluation tensors (reconstruction, quantization, scoring) and
                              the train-split samples reconstruction adds
    RUN_DIR/latency.json      the block latency model (predicted latency)
    RUN_DIR/precision.json    the measured per-layer-kind, per-precision latency table (predicted latency)
    RUN_DIR/baselines/        full float and full INT8 ONNX: every latency is timed interleaved with them
    RUN_DIR/baselines.json    the anchors (full float, full INT8, smallest, uniform widths), evaluated once
    RUN_DIR/measurements.json every latency measurement (speedups over full float and full INT8 per round)
    RUN_DIR/costs.json        seconds per evaluated point (reconstruction among them)
    RUN_DIR/state.json        the LINAS state, written after every batch
    RUN_DIR/pareto.csv|json|png   the outputs (modelpress.search.outputs)

Workers never see the folder: the executor shares its inputs once (modelpress.search.workers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.bench.runner import write_json_atomic
from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.passes import Context
from modelpress.progress import QUIET, Reporter
from modelpress.search.evaluate import FAST_REPQ, OBJECTIVES, EvalSettings, Evaluator, quality_range
from modelpress.search.executors import make_executor
from modelpress.search.linas import Problem, run_linas
from modelpress.search.outputs import write_outputs
from modelpress.search.space import SearchSpace, config_key, dedupe
from modelpress.search.spec import SearchSpec
from modelpress.search.supernet import SuperNet
from modelpress.search.workers import (
    DATA,
    SPEC,
    adopt_evaluator,
    baseline_bytes,
    evaluate_item,
    load_evaluator,
    make_payload,
    measure_item,
    save_data,
)

__all__ = ["SPEC", "SearchSpec", "anchors", "load_evaluator", "model_fingerprint", "run_search"]


def model_fingerprint(graph: ModelGraph) -> str:
    """The architecture and a digest of the weights of ``graph``."""
    h = hashlib.sha256(str(graph.source.get("class") or type(graph.module).__name__).encode())
    for name, p in sorted(graph.state().items()):
        h.update(f"{name}{tuple(p.shape)}".encode())
        if p.is_floating_point():
            h.update(np.float64(p.detach().double().sum()).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- run


def run_search(graph: ModelGraph, ctx: Context, run_dir: str | Path, spec: SearchSpec, *,
               latency_table: Any = None, precision_table: Any = None, resume: bool = False,
               max_batches: int | None = None, reporter: Reporter = QUIET) -> dict[str, Any]:
    """Search ``graph``'s sub-networks and precisions as ``spec`` says; returns the outputs' summary.

    ``ctx`` holds the task, the data (its calibration split reconstructs and calibrates, its evaluation split
    scores quality) and the target. ``latency_table`` / ``precision_table``: prebuilt latency models for
    predicted latency (default: measured here on the target). ``resume`` continues the search in ``run_dir``;
    ``max_batches`` stops after that many LINAS batches in this call (the run stays resumable).

    The first batch measures the anchors first (full float, full INT8, the smallest sub-network and the
    uniform widths in the lowest-latency precision; evaluated once, before the loop), then random configs."""
    run = Path(run_dir)
    spec.check()  # before any work: objectives, budget, executor (a dead Ray address fails in seconds)
    if ctx.task is None or ctx.data is None:
        raise ModelpressError("search needs a task and data to score quality on", "give --data")
    space = SearchSpace.from_graph(graph, **spec.space)
    key = getattr(latency_table, "key", None) or {}
    if spec.latency_batch is not None and key.get("batch", spec.latency_batch) != spec.latency_batch:
        raise ModelpressError(f"latency batch {spec.latency_batch} does not fit the latency table's batch {key['batch']}",
                              "give the same batch as the latency table's")
    settings = EvalSettings(
        objectives=list(spec.objectives), latency=spec.latency, reconstruct=spec.reconstruct,
        reconstruct_target=spec.reconstruct_target, reconstruct_samples=spec.reconstruct_samples, rounds=spec.rounds,
        precision_config={**FAST_REPQ, **(spec.precision_config or {})},
        batch=int(spec.latency_batch or key.get("batch") or 1), seq=spec.latency_seq or key.get("seq"))
    fingerprint = {"model": model_fingerprint(graph), "space": space.fingerprint(), **spec.fingerprint(),
                   "latency_shape": [settings.batch, settings.seq]}
    if resume:
        if not (run / SPEC).is_file():
            raise ModelpressError(f"{run} holds no search to resume", "run without --resume first")
        saved = json.loads((run / SPEC).read_text()).get("fingerprint", {})
        if saved != fingerprint:
            differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            raise ModelpressError(
                f"{run} holds a search of another model or space (differs in: {', '.join(differ)})",
                "resume with the same checkpoint and options, or give another -o",
            )
        if not (run / ".prepared").is_file():
            raise ModelpressError(f"{run} was interrupted before its preparation finished", "delete it and start again")
    elif run.exists() and any(run.iterdir()):
        raise ModelpressError(f"{run} already holds files", "pass --resume to continue its search, or give another -o")
    # connect now: an address that answers but is no Ray cluster fails before any work or folder
    ex = make_executor(spec.executor, workers=spec.workers, address=spec.ray_address,
                       target_resource=spec.target_resource)
    with contextlib.closing(ex):
        run.mkdir(parents=True, exist_ok=True)
        if ctx.target is None:
            from modelpress.bench import get_target

            ctx.target = get_target("ort-cpu")
        if not resume:
            _prepare(graph, ctx, run, space, spec, settings, latency_table, reporter)
            write_json_atomic(run / SPEC, {
                "fingerprint": fingerprint, "spec": spec.to_dict(), "space": space.to_dict(),
                "settings": asdict(settings), "task": ctx.task.name, "seed": ctx.seed,
                "target": {"name": ctx.target.name, "threads": ctx.target.threads}, "model": graph.name,
            })
            (run / ".prepared").write_text("ok")
        ev = load_evaluator(run)
        search = _Search(run, ev, ex, reporter, measure_points=settings.measured or spec.measure_front)
        baselines = search.baselines(spec.uniform, precision_table)
        known = {config_key(p["config"]): p["objectives"] for p in baselines["points"].values()}

        space_ = ev.net.space
        lo, up = space_.bounds()
        ranges = {"quality": quality_range(ctx.task.name), "latency": (0.0, np.inf), "size": (0.0, np.inf)}
        problem = Problem(
            lower=lo, upper=up, decode=space_.decode, encode=space_.encode, objectives=list(spec.objectives),
            maximize=[o for o in spec.objectives if OBJECTIVES[o] == "max"], cheap=ev.cheap,
            cheap_objectives=[o for o in ev.cheap_objectives() if o in spec.objectives],
            ranges={o: ranges[o] for o in spec.objectives},
        )
        state = run_linas(
            problem, lambda configs: search.evaluate_batch(configs, known), run / "state.json", budget=spec.budget,
            batch_size=spec.batch_size, seed=ctx.seed, fingerprint=fingerprint,
            initial=list(anchors(space_, spec.uniform).values()), pop_size=spec.pop_size,
            generations=spec.generations, max_batches=max_batches, resume=resume, reporter=reporter,
        )
        finished = len(state["records"]) >= spec.budget
        if finished and settings.latency == "predicted" and "latency" in spec.objectives and spec.measure_front:
            search.measure_front(state, baselines, problem)  # a stopped search's front is timed when it ends
        return write_outputs(run, state, baselines, problem)


class _Search:
    """The driver's side of a run: evaluations through the executor, latency measurements on the target, and
    what they cost, written into the run folder."""

    def __init__(self, run: Path, ev: Evaluator, ex: Any, reporter: Reporter, *, measure_points: bool) -> None:
        self.run, self.ev, self.ex, self.reporter = run, ev, ex, reporter
        self.measure_points = measure_points  # False: a predicted-only search (no point is timed)
        payload = make_payload(run)
        if ex.in_process:  # this process is the worker: it evaluates with the driver's evaluator, not a second copy
            adopt_evaluator(payload, ev)
        self.payload = ex.share(payload)
        self.bases: Any = None
        self.reference_ms: float | None = None
        self.measurements = _load(run / "measurements.json", {})
        self.costs = _load(run / "costs.json", [])

    # ----- evaluation and measurement
    def evaluate(self, configs: list[dict[str, Any]], *, want_onnx: bool = False) -> list[dict[str, Any]]:
        """Worker evaluations of ``configs`` (quality; ONNX bytes when asked or timed) with their cost."""
        t0 = time.perf_counter()
        results = self.ex.map(evaluate_item, [(c, want_onnx) for c in configs], self.payload) if configs else []
        seconds = (time.perf_counter() - t0) / max(len(configs), 1)
        self.costs += [{"seconds": seconds, "reconstruct_s": r["reconstruct_s"], "reconstruct_kept": r["reconstruct_kept"],
                        "worker": r["worker"]} for r in results]
        write_json_atomic(self.run / "costs.json", self.costs)
        return results

    def measure(self, onnx: dict[str, bytes]) -> dict[str, dict[str, float]]:
        """Latency of ONNX bytes on the target, interleaved with full float and full INT8 (recorded)."""
        if not onnx:
            return {}
        out = self.ex.on_target(measure_item, (onnx, self.reference_ms), self.payload, self.bases)
        return {n: out[n] for n in onnx}

    def record(self, config: dict[str, Any], row: dict[str, Any]) -> None:
        self.measurements[config_key(config)] = {k: row[k] for k in ("latency", "vs_float", "vs_int8",
                                                                     "rounds_vs_float", "rounds_vs_int8") if k in row}
        write_json_atomic(self.run / "measurements.json", self.measurements)

    def evaluate_batch(self, configs: list[dict[str, Any]], known: dict[str, dict[str, float]]
                       ) -> list[dict[str, float]]:
        """The LINAS batch: every objective of ``configs`` (anchors reuse their baseline values)."""
        ev = self.ev
        todo = [c for c in configs if config_key(c) not in known]
        results = self.evaluate(todo)
        values = [{**r["objectives"], **ev.cheap(c)} for r, c in zip(results, todo, strict=True)]
        folder = self.run / "candidates"
        for r in results:
            if r["onnx"] is not None:  # kept on the driver: what was scored and timed
                folder.mkdir(exist_ok=True)
                (folder / f"c{len(list(folder.glob('*.onnx'))):04d}.onnx").write_bytes(r["onnx"])
        if ev.settings.measured and todo:
            ms = self.measure({str(i): r["onnx"] for i, r in enumerate(results)})
            for i, (v, c) in enumerate(zip(values, todo, strict=True)):
                v["latency"] = ms[str(i)]["latency"]
                self.record(c, ms[str(i)])
        values_of = {**known, **{config_key(c): v for c, v in zip(todo, values, strict=True)}}
        return [{k: float(values_of[config_key(c)][k]) for k in ev.settings.objectives} for c in configs]

    # ----- before the loop: baselines (and the precision table)
    def baselines(self, uniform: tuple[float, ...], precision_table: Any) -> dict[str, Any]:
        """The anchors evaluated once (full float, full INT8 when precision is searched, smallest, uniform
        widths); the full float and INT8 ONNX files every latency is timed against; the precision table."""
        ev, run = self.ev, self.run
        timed = "latency" in ev.settings.objectives
        path = run / "baselines.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            self.reference_ms = saved.get("reference_ms")
            if timed:
                self.bases = self.ex.share(baseline_bytes(run))
            return saved
        configs = anchors(ev.net.space, uniform)
        out: dict[str, Any] = {"points": {}}
        if timed:
            for name in ("full-float", "full-int8"):
                if name in configs:
                    ev.export(configs[name], run / "baselines" / f"{name}.onnx")
            self.bases = self.ex.share(baseline_bytes(run))
        predicted = timed and ev.settings.latency == "predicted"
        if predicted and any(p != "float" for p in ev.net.space.precisions):
            ev.precision_table = precision_table or self._precision_table()
            write_json_atomic(run / "precision.json", ev.precision_table.to_dict())
        timed = timed and self.measure_points
        with self.reporter.step(f"evaluating {len(configs)} baselines"):
            results = self.evaluate(list(configs.values()), want_onnx=timed)
        values = {n: {**r["objectives"], **ev.cheap(configs[n])} for n, r in zip(configs, results, strict=True)}
        if timed:
            ms = self.measure({n: r["onnx"] for n, r in zip(configs, results, strict=True)})
            self.reference_ms = out["reference_ms"] = ms["full-float"]["latency"]
            for n in values:
                row = {**ms[n], "latency": self.reference_ms / ms[n]["vs_float"]}
                self.record(configs[n], row)
                out["points"].setdefault(n, {})["measured"] = {k: row[k] for k in ("latency", "vs_float", "vs_int8")
                                                              if k in row}
                if ev.settings.measured:
                    values[n]["latency"] = row["latency"]
        for n, c in configs.items():
            out["points"].setdefault(n, {}).update(
                {"config": c, "objectives": {k: float(values[n][k]) for k in ev.settings.objectives}})
        write_json_atomic(path, out)
        return out

    def _precision_table(self) -> Any:
        from modelpress.search.precision import build_precision_table

        ev = self.ev
        with self.reporter.step("measuring the per-layer precision table on the target"):
            return build_precision_table(
                ev.net.space, lambda c, p: ev.export(c, p), self.run / "precision",
                lambda files: self.measure({n: Path(p).read_bytes() for n, p in files.items()}),
                {"batch": ev.settings.batch, "seq": ev.settings.seq, "rounds": ev.settings.rounds,
                 "interleaved_with": ["full-float", "full-int8"]},
                {n: float(ev.net.graph.module.get_submodule(n).weight.numel()) for n in ev.net.space.precision_layers})

    # ----- after the loop (predicted latency): the front measured
    def measure_front(self, state: dict[str, Any], baselines: dict[str, Any], problem: Problem) -> None:
        """Time the predicted front's points (and the anchors not timed yet) on the target, interleaved with
        full float and full INT8; their measurements go to measurements.json, read by the outputs."""
        from modelpress.search.linas import pareto_mask

        records = state["records"]
        pts = np.array([problem.vector(r["objectives"]) for r in records])
        front = [records[i]["config"] for i in np.flatnonzero(pareto_mask(pts))]
        todo = [c for c in dedupe(front, set()) if config_key(c) not in self.measurements]
        if not todo:
            return
        with self.reporter.step(f"measuring the {len(todo)} points of the predicted front on the target"):
            results = self.evaluate(todo, want_onnx=True)
            ms = self.measure({str(i): r["onnx"] for i, r in enumerate(results)})
        for i, c in enumerate(todo):
            self.record(c, ms[str(i)])


def _load(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def anchors(space: SearchSpace, uniform: tuple[float, ...]) -> dict[str, dict[str, Any]]:
    """The baselines, which the first batch also measures first, most telling first: full float, full
    INT8, the smallest sub-network, then the uniform widths (widest first), in INT8 when precision is
    searched (named ``-int8``)."""
    low = "int8" if "int8" in space.precisions else "float"
    tag = "-int8" if low == "int8" else ""
    named = {"full-float": space.largest("float"), "full-int8": space.largest("int8") if tag else None,
             f"smallest{tag}": space.smallest(low)}
    named.update({f"uniform-{f:g}{tag}": space.uniform(f, low) for f in sorted(uniform, reverse=True)})
    seen: set[str] = set()
    return {n: c for n, c in named.items() if c is not None and dedupe([c], seen)}


def _prepare(graph: ModelGraph, ctx: Context, run: Path, space: SearchSpace, spec: SearchSpec,
             settings: EvalSettings, latency_table: Any, reporter: Reporter) -> None:
    """Build and save the super-network (and the reference, the data and the latency model) into ``run``."""
    from modelpress.models.saving import save

    net = SuperNet.from_graph(graph, space, saliency=spec.saliency, data=ctx.calibration, task=ctx.task,
                              seed=ctx.seed, reporter=reporter)
    if spec.finetune:
        from modelpress.search.instatune import finetune_supernet
        from modelpress.train import TrainConfig

        n_random = int(spec.finetune.get("n_random", 2))
        cfg = TrainConfig(**{k: v for k, v in spec.finetune.items() if k != "n_random"},
                          checkpoint_dir=run / "checkpoints" / "instatune")
        with reporter.step("InstaTune: fine-tuning the super-network (sandwich rule)"):
            finetune_supernet(net, ctx.data, task=ctx.task, config=cfg, n_random=n_random,
                              reference=graph.copy().module, resume=True, reporter=reporter)
        _replace(run / "reference", lambda p: save(graph, p))
    _replace(run / "supernet", lambda p: save(net.graph, p))
    save_data(ctx.data, run / DATA, train_samples=settings.reconstruct_samples if settings.reconstruct else 0)
    if "latency" in settings.objectives and settings.latency == "predicted":
        table = latency_table
        if table is None:
            from modelpress.bench import build_latency_table

            with reporter.step("latency model: measuring the block table on the target"):
                table = build_latency_table(graph, ctx.target, batch=settings.batch, seq=settings.seq,
                                            grid=spec.latency_grid, reporter=reporter)
        table.save(run / "latency.json")


def _replace(path: Path, write: Any) -> None:
    if path.exists():
        shutil.rmtree(path)
    write(path)
