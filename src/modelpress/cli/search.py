"""`modelpress search [CKPT] ...`: super-network search over architecture and precision (InstaTune + LINAS);
`modelpress search extract RUN_DIR --point N | --max-latency MS | --min-quality Q -o OUT [--rounds R] [--overwrite]`:
write a point, its latency timed again in R fresh rounds and checked against the search's (a warning when not
reproduced)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Annotated

import typer

from modelpress.cli.common import (
    AsJson,
    Data,
    InputShape,
    Overwrite,
    Quiet,
    Seed,
    TargetOpt,
    Threads,
    TokenFile,
    TrustPickle,
    check_output_dir,
    load_graph,
    print_json,
    print_rich,
    reporter,
    resolve_target,
)
from modelpress.errors import ModelpressError


def search(
    ckpt: Annotated[str | None, typer.Argument(
        help="The checkpoint to search (see `compress`; default: all-MiniLM-L6-v2), or `extract`.")] = None,
    run_dir: Annotated[Path | None, typer.Argument(help="With `extract`: the search's run folder.")] = None,
    objectives: Annotated[str, typer.Option("--objectives", help="quality,latency[,size]")] = "quality,latency",
    budget: Annotated[int, typer.Option("--budget", help="Real evaluations in all.")] = 32,
    batch: Annotated[int, typer.Option("--batch", help="Candidates measured per LINAS batch.")] = 8,
    executor: Annotated[str, typer.Option("--executor", help="local | ray")] = "local",
    workers: Annotated[int, typer.Option("--workers", help="Evaluation processes (local) or CPUs (local Ray).")] = 1,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="An existing Ray cluster.")] = None,
    latency: Annotated[str, typer.Option("--latency", help="measured (every candidate timed on the target) | predicted (latency model steers the search; the front is then timed)")] = "measured",
    latency_batch: Annotated[int, typer.Option("--latency-batch", help="Batch size latency is measured at (a compute-bound one for small models).")] = 1,
    precisions: Annotated[str, typer.Option("--precisions", help="Precision genes, e.g. float,int8 (float: none).")] = "float,int8",
    finetune_steps: Annotated[int, typer.Option("--finetune-steps", help="InstaTune sandwich steps (0: none).")] = 0,
    reconstruct: Annotated[bool, typer.Option("--reconstruct/--no-reconstruct", help="Refit every sub-network's layers on calibration data before scoring it.")] = True,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the search in -o.")] = False,
    rounds: Annotated[int | None, typer.Option("--rounds", help="Interleaved rounds of every latency measurement (search, default 3), or of extract's fresh measurement checked against the search's (default: the search's).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run folder (search) or model folder (extract).")] = None,
    point: Annotated[int | None, typer.Option("--point", help="extract: Pareto point N (see pareto.csv).")] = None,
    max_latency: Annotated[float | None, typer.Option("--max-latency", help="extract: best quality under MS.")] = None,
    min_quality: Annotated[float | None, typer.Option("--min-quality", help="extract: fastest with quality >= Q.")] = None,
    data: Data = None,
    target: TargetOpt = "ort-cpu",
    threads: Threads = None,
    token_file: TokenFile = None,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
    trust_pickle: TrustPickle = False,
    input_shape: InputShape = None,
) -> None:
    """Search sub-networks and per-layer precision of a checkpoint for the Pareto front of the objectives."""
    if ckpt == "extract":
        if run_dir is None or output is None:
            raise ModelpressError("extract needs the run folder and -o", "modelpress search extract RUN_DIR --point 0 -o OUT")
        check_output_dir(output, overwrite)
        from modelpress.search.outputs import LatencyNotReproduced, extract

        with warnings.catch_warnings():  # printed below as one line, not as Python's warning with its source line
            warnings.simplefilter("ignore", LatencyNotReproduced)
            result = extract(run_dir, output, point=point, max_latency=max_latency, min_quality=min_quality,
                             overwrite=overwrite, rounds=rounds)
        if as_json:
            print_json(result)
        else:
            print_rich(f"wrote {result['output']} (point {result['point']['point']}: {result['point']['objectives']})")
        for line in result["warnings"]:  # on stderr even with --quiet or --json: the reported latency may be wrong
            typer.echo(f"warning: {line}", err=True)
        return
    if run_dir is not None:
        raise ModelpressError(f"unexpected argument {str(run_dir)!r}: search takes one checkpoint",
                              "give the run folder as -o RUN_DIR (or `modelpress search extract RUN_DIR ...`)")
    if output is None:
        raise ModelpressError("search needs a run folder", "give -o RUN_DIR")
    from modelpress.data import infer_task, load_data
    from modelpress.passes import Context
    from modelpress.search.run import run_search
    from modelpress.search.spec import SearchSpec

    objs = [o.strip() for o in objectives.split(",") if o.strip()]
    from modelpress.search.evaluate import check_latency_mode, check_objectives

    check_objectives(objs)
    check_latency_mode(latency)
    from modelpress.search.executors import make_executor

    # a device target is asked first (one line in seconds when its address or token is wrong), and its token
    # file is in the environment before worker processes start
    tgt = resolve_target(target, threads, token_file)
    # checked (a dead Ray address: one line in seconds) and connected before loading anything: an address that
    # answers but is no Ray cluster fails here too; the search reuses the connection
    with contextlib.closing(make_executor(executor, workers=workers, address=ray_address)):
        rep = reporter(quiet or as_json)
        graph = load_graph(None if ckpt in (None, "", "default") else ckpt, trust_pickle, input_shape, rep, seed)
        task_data = load_data(data, graph.input_spec, graph.tokenizer, batch_size=32, n_calibration=64,
                              n_evaluation=200, seed=seed)
        ctx = Context(workdir=output / "work", task=infer_task(graph.input_spec, graph.module), data=task_data,
                      reference=graph, target=tgt, seed=seed, reporter=rep)
        finetune = {"steps": finetune_steps, "lr": 5e-5, "batch_size": 16} if finetune_steps else None
        spec = SearchSpec(
            objectives=tuple(objs), budget=budget, batch_size=batch, latency=latency, latency_batch=latency_batch,
            finetune=finetune, reconstruct=reconstruct, executor=executor, workers=workers, ray_address=ray_address,
            space={"precisions": tuple(p.strip() for p in precisions.split(",") if p.strip())},
            **({"rounds": rounds} if rounds is not None else {}))
        summary = run_search(graph, ctx, output, spec, resume=resume, reporter=rep)
    if as_json:
        print_json({k: v for k, v in summary.items() if k != "batches"})
        return
    from rich.table import Table

    source = summary.get("latency_source")
    table = Table(title=f"Pareto front ({summary['evaluated']} evaluated, hypervolume {summary['hypervolume']:.4g}"
                        + (f"; latency {source}" if source else "") + ")")
    table.add_column("point")
    for o in objs:
        table.add_column(f"{o} ({'measured ms' if source == 'measured' else 'PREDICTED ms'})" if o == "latency" else o)
    for p in summary["pareto"]:
        table.add_row(str(p["point"]), *[f"{p['objectives'][o]:.4g}" for o in objs])
    print_rich(table, f"outputs in {output}: pareto.csv, pareto.json, pareto.png")
