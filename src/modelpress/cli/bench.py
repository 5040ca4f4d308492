"""`modelpress bench`: latency of an ONNX file (or a checkpoint, exported first) on a Target."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from modelpress.cli.common import (
    AsJson,
    InputShape,
    Quiet,
    TargetOpt,
    Threads,
    TrustPickle,
    check_output_file,
    load_graph,
    print_json,
    print_rich,
    reporter,
)
from modelpress.errors import ModelpressError


def bench(
    model: Annotated[str | None, typer.Argument(help="MODEL.onnx or a checkpoint (exported first)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSON file (default bench-NAME.json).")] = None,
    target: TargetOpt = "ort-cpu", threads: Threads = None,
    batch: Annotated[list[int] | None, typer.Option("--batch", help="Batch sizes.")] = None,
    seq: Annotated[list[int] | None, typer.Option("--seq", help="Sequence lengths (text models).")] = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved rounds.")] = 3,
    quiet: Quiet = False, as_json: AsJson = False, trust_pickle: TrustPickle = False, input_shape: InputShape = None,
) -> None:
    """Measure ONNX Runtime latency (median, p90, p99, CV, throughput, memory, file size); table + JSON."""
    from modelpress.bench import get_target, input_spec_from_onnx, measure
    from modelpress.export import export_onnx

    if output is not None:  # a bad -o fails before anything is measured
        check_output_file(output)
    rep = reporter(quiet or as_json)
    tgt = get_target(target, threads=threads)
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
