"""`modelpress export`: one verified ONNX file, with the graph optimizations that measure fastest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelpress.cli.common import (
    AsJson,
    Ckpt,
    InputShape,
    Overwrite,
    Quiet,
    TargetOpt,
    Threads,
    TrustPickle,
    check_output_file,
    load_graph,
    print_json,
    reporter,
)


def export(
    ckpt: Ckpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="ONNX file to write.")] = Path("model.onnx"),
    optimize: Annotated[str, typer.Option("--optimize", help="auto | none | ort | transformer | onnxslim")] = "auto",
    overwrite: Overwrite = False, quiet: Quiet = False, as_json: AsJson = False, trust_pickle: TrustPickle = False,
    target: TargetOpt = "ort-cpu", threads: Threads = None, input_shape: InputShape = None,
) -> None:
    """Export to ONNX (verified against torch), with the graph optimizations that measure fastest."""
    from modelpress.bench import candidate_timer, get_target
    from modelpress.export import export_onnx

    check_output_file(output, overwrite)
    rep = reporter(quiet or as_json)
    graph = load_graph(ckpt, trust_pickle, input_shape, rep)
    result = export_onnx(
        graph.module, graph.input_spec, output, optimize=optimize, timer=candidate_timer(get_target(target, threads)), reporter=rep,
    )
    info = {"path": str(output), "optimization": getattr(result, "optimization", None),
            "file_size_bytes": getattr(result, "file_size_bytes", None)}
    v = getattr(result, "verification", None)
    if v is not None:
        info["max_abs_err"], info["cosine"] = v.max_abs_err, v.cosine
    if as_json:
        print_json(info)
    else:
        typer.echo(f"wrote {output} ({info['optimization']}; max abs err {info.get('max_abs_err', float('nan')):.2e})")
