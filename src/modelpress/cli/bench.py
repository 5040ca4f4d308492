"""`modelpress bench`: latency of an ONNX file (or a checkpoint, exported first) on a Target."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from modelpress.cli.common import (
    AsJson,
    InputShape,
    Quiet,
    TargetOpt,
    Threads,
    TokenFile,
    TrustPickle,
    check_output_file,
    decoder_lowering_of,
    load_graph,
    print_json,
    print_rich,
    reporter,
    resolve_target,
)
from modelpress.errors import ModelpressError


def bench(
    model: Annotated[str | None, typer.Argument(help="MODEL.onnx or a checkpoint (exported first)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSON file (default bench-NAME.json).")] = None,
    target: TargetOpt = "ort-cpu", threads: Threads = None, token_file: TokenFile = None,
    batch: Annotated[list[int] | None, typer.Option("--batch", help="Batch sizes.")] = None,
    seq: Annotated[list[int] | None, typer.Option("--seq", help="Sequence lengths (text models).")] = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved rounds.")] = 3,
    quiet: Quiet = False, as_json: AsJson = False, trust_pickle: TrustPickle = False, input_shape: InputShape = None,
    latency_table: Annotated[str | None, typer.Option(
        "--latency-table", help="Build (or load from the cache) the latency table of this checkpoint ('default': "
        "MiniLM) on the target: per-block latency over a grid of widths, for latency-aware pruning.")] = None,
    grid: Annotated[str | None, typer.Option(
        "--grid", help="Latency-table grid axes, e.g. 'heads=1,6,12;mlp=384,1536;embed=384' (head_dim too).")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Measure the latency table again, ignoring the cache.")] = False,
    clock: Annotated[str, typer.Option("--clock", help="Latency table: 'wall' time, or process 'cpu' time "
                                       "(1 thread only; steadier on a busy machine).")] = "wall",
    generate: Annotated[bool | None, typer.Option(
        "--generate/--no-generate", help="Causal LMs (a checkpoint, or a decoder .onnx with past_key_values "
        "inputs): time greedy generation through the key-value cache, prefill ms, decode ms/token, tokens/s "
        "(default for them); a checkpoint is compared with torch generate.")] = None,
    prompt: Annotated[int | None, typer.Option("--prompt", help="Generation: prompt tokens (default 128, "
                                               "capped at the model's positions).")] = None,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Generation: tokens to generate.")] = 32,
    two_graphs: Annotated[bool, typer.Option("--two-graphs", help="Generation of a checkpoint: also time the "
                                             "two-graph form (a prefill graph without past inputs).")] = False,
) -> None:
    """Measure ONNX Runtime latency (median, p90, p99, CV, throughput, memory, file size); table + JSON.
    Causal LMs: generation (prefill, per-token decode, tokens/s) through the key-value cache.
    With --latency-table CKPT: the per-block latency table of CKPT on the target instead."""
    from modelpress.bench import input_spec_from_onnx, measure
    from modelpress.export import export_onnx

    if output is not None:  # a bad -o fails before anything is measured
        check_output_file(output)
    rep = reporter(quiet or as_json)
    tgt = resolve_target(target, threads, token_file)
    if latency_table is not None:
        if model is not None:
            raise ModelpressError("give either MODEL or --latency-table CKPT, not both",
                                  "modelpress bench --latency-table CKPT")
        _latency_table(latency_table, tgt, batch, seq, grid, rounds, rebuild, clock, output, as_json, rep,
                       trust_pickle, input_shape)
        return
    if grid is not None or rebuild or clock != "wall":
        raise ModelpressError("--grid, --rebuild and --clock go with --latency-table CKPT", "add --latency-table CKPT")
    if generate is not False and _generation(model, generate, tgt, batch, rounds, prompt, new_tokens, two_graphs,
                                             output, as_json, rep, trust_pickle, input_shape):
        return
    if prompt is not None or two_graphs:
        raise ModelpressError("--prompt and --two-graphs go with generation (a causal LM)", "drop them")
    tmp = None
    try:
        if model and model.endswith(".onnx"):
            path = Path(model)
            if not path.exists():
                raise ModelpressError(f"ONNX file not found: {model}", "check the path")
            spec = input_spec_from_onnx(path)
            name = path.stem
        else:
            graph = load_graph(model, trust_pickle, input_shape, rep)
            tmp = Path(tempfile.mkdtemp(prefix="modelpress-bench-"))
            path = Path(export_onnx(graph.module, graph.input_spec, tmp / "model.onnx", optimize="none", reporter=rep).path)
            spec, name = graph.input_spec, graph.name
        out = output or Path(f"bench-{name}.json")
        check_output_file(out)
        result = measure({name: path}, spec, tgt, rounds=rounds, reporter=rep, batch_sizes=batch or None,
                         seq_lens=seq or None)
        result.write_json(out)
        if as_json:
            print_json(result.to_json())
        else:
            print_rich(result.to_table(), f"wrote {out}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _latency_table(ckpt: str, tgt: Any, batch: list[int] | None, seq: list[int] | None, grid: str | None,
                   rounds: int, rebuild: bool, clock: str, output: Path | None, as_json: bool, rep: Any,
                   trust_pickle: bool, input_shape: str | None) -> None:
    from modelpress.bench.latency import build_latency_table

    if len(batch or []) > 1 or len(seq or []) > 1:
        raise ModelpressError("a latency table is for one batch size and one sequence length",
                              "give --batch and --seq once each")
    graph = load_graph(None if ckpt == "default" else ckpt, trust_pickle, input_shape, rep)
    table = build_latency_table(graph, tgt, batch=(batch or [1])[0], seq=(seq or [None])[0], grid=grid,
                                rounds=rounds, refresh=rebuild, clock=clock, reporter=rep)
    if output is not None:
        table.save(output)
    if as_json:
        print_json(table.to_dict())
    else:
        print_rich(table.to_table(), *([f"wrote {output}"] if output is not None else []))


def _generation(model: str | None, generate: bool | None, tgt: Any, batch: list[int] | None, rounds: int,
                prompt: int | None, new_tokens: int, two_graphs: bool, output: Path | None, as_json: bool, rep: Any,
                trust_pickle: bool, input_shape: str | None) -> bool:
    """Time generation when asked (``generate``) or when the model is a causal LM; False: not one, bench as usual."""
    from modelpress.bench.generation import layout_from_onnx, measure_generation
    from modelpress.export.decoder import export_decoder, is_causal_lm, require_causal_lm

    tmp = None
    try:
        if model and model.endswith(".onnx"):
            path = Path(model)
            if not path.exists():
                raise ModelpressError(f"ONNX file not found: {model}", "check the path")
            if generate is None:
                import onnx

                names = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
                if not any(n.startswith("past_key_values.") for n in names):
                    return False
            layout = layout_from_onnx(path)
            if two_graphs:
                raise ModelpressError("--two-graphs needs a checkpoint (it exports both forms)", "bench the checkpoint")
            variants: dict[str, Any] = {"onnx": path}
            name = path.stem
        else:
            graph = load_graph(model, trust_pickle, input_shape, rep)
            if generate is None and not is_causal_lm(graph.module):
                return False
            require_causal_lm(graph.module)
            tmp = Path(tempfile.mkdtemp(prefix="modelpress-bench-"))
            result = export_decoder(graph.module, tmp / "decoder.onnx", two_graphs=two_graphs,
                                    lowering=decoder_lowering_of(graph.module), reporter=rep)
            layout, name = result.layout, graph.name
            variants = {"onnx": result.path}
            if result.prefill_path is not None:
                variants["onnx-two-graphs"] = (result.path, result.prefill_path)
            variants["torch-generate"] = graph.module
        out = output or Path(f"bench-{name}-generation.json")
        check_output_file(out)
        report = measure_generation(variants, tgt, layout=layout, prompt_len=prompt, new_tokens=new_tokens,
                                    batch_sizes=batch or None, rounds=rounds, reporter=rep)
        report.write_json(out)
        if as_json:
            print_json(report.to_dict())
        else:
            print_rich(report.to_table(), f"wrote {out}")
        return True
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
