"""One search run, in a run folder that holds everything needed to resume it or to evaluate in a worker:

    RUN_DIR/search.json     the spec: model fingerprint, space, objectives, evaluation settings, data, seed
    RUN_DIR/supernet/       the (re-ordered, optionally fine-tuned) super-network, saved without pickle
    RUN_DIR/reference/      the original model when the super-network was fine-tuned (quality reference)
    RUN_DIR/latency.json    the latency model (predicted latency)
    RUN_DIR/baselines.json  full float, full INT8, uniform-width sub-networks
    RUN_DIR/state.json      the LINAS state, written after every batch
    RUN_DIR/pareto.csv|json|png   the outputs (modelpress.search.outputs)

Workers (processes, Ray tasks) get the run folder's path and a config, and rebuild the evaluator from it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.bench.runner import write_json_atomic
from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.passes import Context
from modelpress.progress import QUIET, Reporter
from modelpress.search.evaluate import (
    OBJECTIVES,
    EvalSettings,
    Evaluator,
    check_latency_mode,
    check_objectives,
)
from modelpress.search.executors import check_executor, make_executor
from modelpress.search.linas import Problem, check_budget, run_linas
from modelpress.search.outputs import write_outputs
from modelpress.search.space import SearchSpace, config_key, dedupe
from modelpress.search.supernet import SuperNet
from modelpress.search.workers import SPEC, evaluate_item, load_evaluator, measure_item

__all__ = ["SPEC", "anchors", "load_evaluator", "model_fingerprint", "run_search"]

def model_fingerprint(graph: ModelGraph) -> str:
    """The architecture and a digest of the weights of ``graph``."""
    h = hashlib.sha256(str(graph.source.get("class") or type(graph.module).__name__).encode())
    for name, p in sorted(graph.state().items()):
        h.update(f"{name}{tuple(p.shape)}".encode())
        if p.is_floating_point():
            h.update(np.float64(p.detach().double().sum()).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- run


def run_search(
    graph: ModelGraph,
    ctx: Context,
    run_dir: str | Path,
    *,
    objectives: list[str],
    budget: int,
    batch_size: int = 8,
    data_spec: dict[str, Any],
    executor: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
    target_resource: str | None = None,
    resume: bool = False,
    latency: str = "predicted",
    space_options: dict[str, Any] | None = None,
    saliency: str = "magnitude",
    finetune: dict[str, Any] | None = None,
    latency_table: Any = None,
    latency_grid: str | None = None,
    precision_config: dict[str, Any] | None = None,
    int8_factor: float | None = None,
    latency_batch: int | None = None,
    latency_seq: int | None = None,
    uniform: tuple[float, ...] = (0.25, 0.5, 0.75),
    generations: int = 40,
    pop_size: int = 48,
    max_batches: int | None = None,
    reporter: Reporter = QUIET,
) -> dict[str, Any]:
    """Search ``graph``'s sub-networks and precisions; returns the outputs' summary (see module docstring).

    ``ctx`` holds the task, the data (its evaluation split scores quality) and the target. ``data_spec``
    says how workers reload that data (``load_data`` arguments). ``finetune``: TrainConfig fields for the
    InstaTune fine-tuning (None: search the pretrained weights as they are). ``int8_factor``: the INT8/float
    block-latency ratio of the latency model (default: measured once at the start, full INT8 against full
    float, interleaved); fixing it makes predicted latency independent of the machine's load.
    ``latency_batch`` / ``latency_seq``: the shape latency is measured at (default: the latency table's, else
    batch 1 and the target's first sequence length); a small model wants a compute-bound batch.

    The first batch measures the anchors first (full float, full INT8, the smallest sub-network and the
    ``uniform`` widths in the lowest-latency precision), then random configs: the front never starts
    behind the obvious baselines, and the predictors see the whole range. The anchors' values come from
    the baselines evaluated before the loop (not evaluated twice); they count in the budget."""
    run = Path(run_dir)
    check_objectives(objectives)
    check_latency_mode(latency)
    check_budget(budget, batch_size)  # before any work
    check_executor(executor, ray_address)  # before any work: Ray installed, its address answering
    if ctx.task is None or ctx.data is None:
        raise ModelpressError("search needs a task and data to score quality on", "give --data")
    space = SearchSpace.from_graph(graph, **(space_options or {}))
    key = getattr(latency_table, "key", None) or {}
    if latency_batch is not None and (latency_batch < 1 or key.get("batch", latency_batch) != latency_batch):
        raise ModelpressError(f"latency batch {latency_batch} does not fit"
                              + (f" the latency table's batch {key['batch']}" if key else ""),
                              "give a positive batch, the same as the latency table's")
    settings = EvalSettings(objectives=list(objectives), latency=latency, int8_factor=int8_factor,
                            batch=int(latency_batch or key.get("batch") or 1), seq=latency_seq or key.get("seq"))
    if precision_config:
        settings.precision_config = {**settings.precision_config, **precision_config}
    fingerprint = {
        "model": model_fingerprint(graph), "space": space.fingerprint(), "latency": latency,
        "finetune": finetune or None, "saliency": saliency, "int8_factor": int8_factor,
        "latency_shape": [settings.batch, settings.seq],
    }
    spec_path = run / SPEC
    if resume:
        if not spec_path.is_file():
            raise ModelpressError(f"{run} holds no search to resume", "run without --resume first")
        spec = json.loads(spec_path.read_text())
        if spec.get("fingerprint") != fingerprint:
            differ = sorted(k for k in fingerprint if spec.get("fingerprint", {}).get(k) != fingerprint[k])
            raise ModelpressError(
                f"{run} holds a search of another model or space (differs in: {', '.join(differ)})",
                "resume with the same checkpoint and options, or give another -o",
            )
        settings = EvalSettings(**spec["settings"])
    elif run.exists() and any(run.iterdir()):
        raise ModelpressError(f"{run} already holds files", "pass --resume to continue its search, or give another -o")
    # connect now: an address that answers but is no Ray cluster fails before any work or folder
    ex = make_executor(executor, workers=workers, address=ray_address, target_resource=target_resource)
    with contextlib.closing(ex):
        run.mkdir(parents=True, exist_ok=True)
        target = ctx.target
        if target is None:
            from modelpress.bench import get_target

            target = ctx.target = get_target("ort-cpu")

        if not resume:
            _prepare(graph, ctx, run, space, settings, saliency, finetune, latency_table, latency_grid, reporter)
            spec = {
                "fingerprint": fingerprint, "space": space.to_dict(), "settings": asdict(settings),
                "task": ctx.task.name, "data": data_spec, "seed": ctx.seed,
                "target": {"name": target.name, "threads": target.threads}, "model": graph.name,
                "objectives": list(objectives),
            }
            write_json_atomic(spec_path, spec)
            spec_path_ok = run / ".prepared"
            spec_path_ok.write_text("ok")
        elif not (run / ".prepared").is_file():
            raise ModelpressError(f"{run} was interrupted before its preparation finished", "delete it and start again")
        evaluator = load_evaluator(run)
        baselines = _baselines(evaluator, run, ex, uniform, reporter)
        base_ms = baselines.get("reference_ms")
        known = {config_key(p["config"]): p["objectives"] for p in baselines["points"].values()}

        def evaluate_batch(configs: list[dict[str, Any]]) -> list[dict[str, float]]:
            todo = [c for c in configs if config_key(c) not in known]
            start = len(list((run / "candidates").glob("*.onnx"))) if (run / "candidates").is_dir() else 0
            items = [(str(run), c, str(run / "candidates" / f"c{start + i:04d}.onnx")
                      if evaluator.settings.quality_backend == "onnx" else None) for i, c in enumerate(todo)]
            results = ex.map(evaluate_item, items) if items else []
            # cheap objectives from this process's evaluator (it holds the measured INT8 factor)
            values = [{**r["objectives"], **evaluator.cheap(c)} for r, c in zip(results, todo, strict=True)]
            if todo and evaluator.settings.latency == "measured" and "latency" in objectives:
                onnx = {str(i): r["onnx"] for i, r in enumerate(results)}
                ms = ex.on_target(measure_item, (str(run), onnx, base_ms))
                for i, v in enumerate(values):
                    v["latency"] = ms[str(i)]
            values_of = {**known, **{config_key(c): v for c, v in zip(todo, values, strict=True)}}
            return [{k: float(values_of[config_key(c)][k]) for k in objectives} for c in configs]

        space_ = evaluator.net.space
        lo, up = space_.bounds()
        problem = Problem(
            lower=lo, upper=up, decode=space_.decode, objectives=list(objectives),
            maximize=[o for o in objectives if OBJECTIVES[o] == "max"], cheap=evaluator.cheap,
            cheap_objectives=[o for o in evaluator.cheap_objectives() if o in objectives], encode=space_.encode,
        )
        state = run_linas(
            problem, evaluate_batch, run / "state.json", budget=budget, batch_size=batch_size, seed=ctx.seed,
            fingerprint=fingerprint, initial=list(anchors(space_, uniform).values()), pop_size=pop_size,
            generations=generations, max_batches=max_batches, resume=resume, reporter=reporter,
        )
    return write_outputs(run, state, baselines, problem)


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


def _prepare(graph: ModelGraph, ctx: Context, run: Path, space: SearchSpace, settings: EvalSettings,
             saliency: str, finetune: dict[str, Any] | None, latency_table: Any, latency_grid: str | None,
             reporter: Reporter) -> None:
    """Build and save the super-network (and the reference and latency model) into ``run``."""
    from modelpress.models.saving import save

    net = SuperNet.from_graph(graph, space, saliency=saliency, data=ctx.calibration, task=ctx.task,
                              seed=ctx.seed, reporter=reporter)
    if finetune:
        from modelpress.search.instatune import finetune_supernet
        from modelpress.train import TrainConfig

        n_random = int(finetune.get("n_random", 2))
        cfg = TrainConfig(**{k: v for k, v in finetune.items() if k != "n_random"},
                          checkpoint_dir=run / "checkpoints" / "instatune")
        with reporter.step("InstaTune: fine-tuning the super-network (sandwich rule)"):
            finetune_supernet(net, ctx.data, task=ctx.task, config=cfg, n_random=n_random,
                              reference=graph.copy().module, resume=True, reporter=reporter)
        _replace(run / "reference", lambda p: save(graph, p))
    _replace(run / "supernet", lambda p: save(net.graph, p))
    if "latency" in settings.objectives and settings.latency == "predicted":
        table = latency_table
        if table is None:
            from modelpress.bench import build_latency_table

            with reporter.step("latency model: measuring the block table on the target"):
                table = build_latency_table(graph, ctx.target, batch=settings.batch, seq=settings.seq,
                                            grid=latency_grid, reporter=reporter)
        table.save(run / "latency.json")


def _replace(path: Path, write: Any) -> None:
    if path.exists():
        shutil.rmtree(path)
    write(path)


def _baselines(evaluator: Evaluator, run: Path, ex: Any, uniform: tuple[float, ...],
               reporter: Reporter) -> dict[str, Any]:
    """The anchors (full float, full INT8 when precision is searched, smallest, uniform widths), evaluated once;
    with precision and predicted latency, the INT8/float latency factor is measured here (interleaved)."""
    path = run / "baselines.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("int8_factor") is not None:
            evaluator.settings.int8_factor = saved["int8_factor"]
        return saved
    configs = anchors(evaluator.net.space, uniform)
    out: dict[str, Any] = {"points": {}}
    folder = run / "baselines"
    folder.mkdir(exist_ok=True)
    measured = evaluator.settings.latency == "measured" and "latency" in evaluator.settings.objectives
    need_files = measured or "full-int8" in configs
    onnx: dict[str, str] = {}
    if need_files:
        for name in ("full-float", "full-int8"):
            if name in configs:
                graph, exporter = evaluator.build(configs[name])
                onnx[name] = str(evaluator.ctx.export(graph, folder / f"{name}.onnx", exporter=exporter).path)
    if "full-int8" in onnx and evaluator.settings.int8_factor is not None:
        out["int8_factor"] = evaluator.settings.int8_factor
    elif "full-int8" in onnx:
        with reporter.step("measuring full INT8 against full float (the precision factor of the latency model)"):
            ms = ex.on_target(measure_item, (str(run), {"full-int8": onnx["full-int8"]}, None))
        out["int8_factor"] = ms["full-int8"] / ms["__baseline__"]
        out["reference_ms"] = ms["__baseline__"]
        evaluator.settings.int8_factor = out["int8_factor"]
        spec = json.loads((run / SPEC).read_text())  # workers started later read the factor from the spec
        spec["settings"]["int8_factor"] = out["int8_factor"]
        write_json_atomic(run / SPEC, spec)
    with reporter.step(f"evaluating {len(configs)} baselines"):
        items = [(str(run), c, str(folder / f"{n}.onnx") if evaluator.settings.quality_backend == "onnx" else None)
                 for n, c in configs.items()]
        results = ex.map(evaluate_item, items)
    objectives = evaluator.settings.objectives
    values = {n: {**r["objectives"], **evaluator.cheap(configs[n])} for n, r in zip(configs, results, strict=True)}
    if measured:
        ms = ex.on_target(measure_item, (str(run), {n: r["onnx"] for n, r in zip(configs, results, strict=True)},
                                         out.get("reference_ms")))
        out.setdefault("reference_ms", ms["__baseline__"])  # the reference: full float, timed with the baselines
        for n in values:
            values[n]["latency"] = ms[n]
    for n, c in configs.items():
        out["points"][n] = {"config": c, "objectives": {k: float(values[n][k]) for k in objectives}}
    write_json_atomic(path, out)
    return out
