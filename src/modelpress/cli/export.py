"""`modelpress export`: one verified ONNX file, with the graph optimizations that measure fastest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from modelpress.cli.common import (
    AsJson,
    Ckpt,
    InputShape,
    Overwrite,
    Quiet,
    TargetOpt,
    Threads,
    TokenFile,
    TrustPickle,
    check_output_file,
    check_writable,
    decoder_lowering_of,
    load_graph,
    print_json,
    reporter,
    resolve_target,
)
from modelpress.errors import ModelpressError

# --attention -> export_decoder's ``fused``
ATTENTION: dict[str, bool | str] = {"auto": "auto", "fused": True, "plain": False}


def export(
    ckpt: Ckpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="ONNX file to write.")] = Path("model.onnx"),
    optimize: Annotated[str, typer.Option("--optimize", help="auto | none | ort | transformer | onnxslim")] = "auto",
    overwrite: Overwrite = False, quiet: Quiet = False, as_json: AsJson = False, trust_pickle: TrustPickle = False,
    target: TargetOpt = "ort-cpu", threads: Threads = None, token_file: TokenFile = None,
    input_shape: InputShape = None,
    decoder: Annotated[bool | None, typer.Option(
        "--decoder/--no-decoder", help="Causal LMs: write the decoder with a key-value cache (ONNX Runtime GenAI "
        "naming, verified by greedy generation) plus genai_config.json and the tokenizer files beside it "
        "(default for causal LMs); --no-decoder writes the full-sequence graph.")] = None,
    two_graphs: Annotated[bool, typer.Option(
        "--two-graphs", help="With --decoder: also write NAME.prefill.onnx, a prefill graph without past inputs.")] = False,
    attention: Annotated[str, typer.Option(
        "--attention", help="With --decoder: fused | plain | auto. fused: ONNX Runtime's GroupQueryAttention "
        "(its own rotary; an error where a model has no fused form); plain: standard ONNX ops; auto: fused where "
        "every attention module has a fused form and the fused graph verifies, else plain.")] = "auto",
) -> None:
    """Export to ONNX (verified against torch), with the graph optimizations that measure fastest; causal LMs
    as a decoder with a key-value cache that runs under ONNX Runtime GenAI."""
    from modelpress.bench import candidate_timer
    from modelpress.export import export_onnx
    from modelpress.export.decoder import is_causal_lm, require_causal_lm

    if attention not in ATTENTION:
        raise ModelpressError(f"--attention {attention!r} is not a choice", f"use one of {', '.join(ATTENTION)}")
    check_output_file(output, overwrite)
    tgt = resolve_target(target, threads, token_file)
    rep = reporter(quiet or as_json)
    graph = load_graph(ckpt, trust_pickle, input_shape, rep)
    if decoder or (decoder is None and is_causal_lm(graph.module)):
        require_causal_lm(graph.module)
        _export_decoder(graph, output, two_graphs, overwrite, as_json, rep, ATTENTION[attention])
        return
    if two_graphs:
        raise ModelpressError("--two-graphs goes with the decoder export of a causal LM", "drop --two-graphs")
    if attention != "auto":
        raise ModelpressError("--attention goes with the decoder export of a causal LM", "drop --attention")
    result = export_onnx(
        graph.module, graph.input_spec, output, optimize=optimize, timer=candidate_timer(tgt), reporter=rep,
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


def _export_decoder(graph: Any, output: Path, two_graphs: bool, overwrite: bool, as_json: bool, rep: Any,
                    fused: bool | str = "auto") -> None:
    """The decoder at ``output``, genai_config.json and the checkpoint's tokenizer files beside it."""
    from modelpress.export.decoder import export_decoder, write_genai_config

    config = output.parent / "genai_config.json"
    if config.exists() and not overwrite:
        raise ModelpressError(f"{config} already exists", "pass --overwrite to replace it, or choose another -o folder")
    check_writable(config)
    result = export_decoder(graph.module, output, two_graphs=two_graphs, lowering=decoder_lowering_of(graph.module),
                            fused=fused, reporter=rep)
    info: dict[str, Any] = {"path": str(output), "form": "two graphs" if two_graphs else "one graph",
                            "file_size_bytes": result.file_size_bytes, **result.to_dict()}
    source = graph.source.get("path") if isinstance(graph.source, dict) else None
    try:
        info["written"] = write_genai_config(output.parent, result.layout, output.name, tokenizer_dir=source,
                                             tokenizer=graph.tokenizer)
    except ModelpressError as exc:  # the decoder runs in ONNX Runtime; only GenAI's config is missing
        info["genai_config"] = f"not written: {exc}"
    if as_json:
        print_json(info)
        return
    v = result.verification
    form = (result.attention or {}).get("form", "")
    typer.echo(f"wrote {output} (decoder with a key-value cache, {form} attention; "
               f"{v.describe() if v else 'not verified'})")
    if "written" in info:
        typer.echo(f"wrote {', '.join(info['written'])} in {output.parent}/ (runs under onnxruntime_genai.Model)")
    else:
        typer.echo(info["genai_config"], err=True)
