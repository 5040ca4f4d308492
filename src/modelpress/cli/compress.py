"""`modelpress compress | prune | quantize`: run a recipe (built-in, a YAML file, or one pass built from
the options) and write the output folder: model, model.onnx, report.json, report.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from modelpress.cli.common import (
    AsJson,
    Ckpt,
    Data,
    InputShape,
    Out,
    Overwrite,
    Quiet,
    Seed,
    TargetOpt,
    Threads,
    TokenFile,
    TrustPickle,
    check_output_dir,
    jsonable,
    load_graph,
    print_json,
    print_rich,
    reporter,
    resolve_target,
)
from modelpress.errors import ModelpressError


def run_recipe(
    recipe_ref: Any, ckpt: str | None, data: str | None, out: Path | None, overwrite: bool, quiet: bool,
    as_json: bool, trust_pickle: bool, target: str, threads: int | None, seed: int, input_shape: str | None,
    token_file: Path | None = None,
) -> None:
    """Shared body of compress/prune/quantize: load, run the pipeline, write the output folder atomically."""
    from modelpress.compress.pipeline import Pipeline
    from modelpress.compress.recipe import Recipe, load_recipe
    from modelpress.compress.report import classwise_summary, render_markdown, render_table
    from modelpress.models import saving
    from modelpress.passes import Context

    recipe = recipe_ref if isinstance(recipe_ref, Recipe) else load_recipe(recipe_ref)
    tgt = resolve_target(target, threads, token_file)
    if out is not None:  # a bad -o fails before the model loads
        check_output_dir(out, overwrite)
    rep = reporter(quiet)
    graph = load_graph(ckpt, trust_pickle, input_shape, rep, seed)
    if out is None:
        out = Path(f"compressed-{graph.name}-{recipe.name}")
        check_output_dir(out, overwrite)
    from modelpress.data import infer_task, load_data
    from modelpress.models.saving import staged_dir

    task_data = load_data(data, graph.input_spec, graph.tokenizer, seed=seed, n_calibration=128)
    # training checkpoints (recover) live beside the output until the run completes: an interrupted run
    # leaves no output folder, and the same command run again resumes from them
    checkpoints = out.parent / f".{out.name}.checkpoints"
    with staged_dir(out, overwrite=overwrite) as tmp:
        ctx = Context(
            workdir=tmp / "work", task=infer_task(graph.input_spec, graph.module), data=task_data,
            target=tgt, seed=seed, reporter=rep, checkpoints=checkpoints,
        )
        try:
            result = Pipeline(recipe).run(graph, ctx)
        except KeyboardInterrupt:
            if checkpoints.is_dir():
                typer.echo(f"interrupted: training checkpoints kept in {checkpoints}; run the same command again "
                           "to resume", err=True)
            raise
        with rep.step("writing the output folder"):
            saving.write_into(result.graph, tmp)
            from modelpress.export.files import copy_onnx

            copy_onnx(result.onnx_path, tmp / "model.onnx")  # with its external data, if any
            if result.decoder is not None:  # causal LMs: the cached decoder, runnable under ONNX Runtime GenAI
                _write_decoder(result, graph, tmp)
            report = result.report
            split = classwise_summary(report)
            if split is not None:  # what the recipe produced, beside the full model's numbers
                report["classwise"] = split
            if tgt.name == "tensorrt":
                report["tensorrt_engine"] = _tensorrt_engine(tmp / "model.onnx", graph, tmp / "model.plan")
            report["data"] = getattr(task_data, "description", str(data))
            report["task"] = ctx.task.name
            report["output"] = str(out)
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=jsonable))
            (tmp / "report.md").write_text(render_markdown(report))
            for name, folder in ctx.extras.get("artifacts", {}).items():  # what passes made for the user
                shutil.move(str(folder), str(tmp / name))
            shutil.rmtree(tmp / "work", ignore_errors=True)
    shutil.rmtree(checkpoints, ignore_errors=True)
    if as_json:
        print_json(report)
    else:
        extra = ", classwise/ (the sub-models)" if "classwise" in report else ""
        if "written" in ((report.get("decoder") or {}).get("genai") or {}):
            extra += ", decoder.onnx + genai_config.json (cached decoder for onnxruntime-genai)"
        print_rich(render_table(report), f"wrote {out}/ (model.onnx, model.safetensors, report.json, report.md{extra})")
    _print_warnings(report)


def _write_decoder(result: Any, graph: Any, folder: Path) -> None:
    """decoder.onnx, genai_config.json and the checkpoint's tokenizer files into the output folder."""
    from modelpress.export.decoder import copy_decoder, write_genai_config

    copy_decoder(result.decoder.path, folder / "decoder.onnx")
    source = graph.source.get("path") if isinstance(graph.source, dict) else None
    try:
        written = write_genai_config(folder, result.decoder.layout, "decoder.onnx", tokenizer_dir=source,
                                     tokenizer=graph.tokenizer)
        result.report.setdefault("decoder", {})["genai"] = {"written": ["decoder.onnx", *written]}
    except ModelpressError as exc:  # decoder.onnx runs in ONNX Runtime; GenAI's config is what is missing
        result.report.setdefault("decoder", {})["genai"] = {"error": exc.problem}


def _print_warnings(report: dict[str, Any]) -> None:
    """The report's warnings (slower or larger than the original) and suggestions, on stderr even with
    --quiet or --json: they say the result may not be worth using."""
    for warning in report.get("warnings", []):
        typer.echo(f"warning: {warning}", err=True)
    for suggestion in report.get("suggestions", []) if report.get("warnings") else []:
        typer.echo(f"  -> try: {suggestion}", err=True)


def compress(
    ckpt: Ckpt = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Built-in recipe name or YAML file.")] = "default",
    data: Data = None, output: Out = None, overwrite: Overwrite = False, quiet: Quiet = False, as_json: AsJson = False,
    trust_pickle: TrustPickle = False, target: TargetOpt = "ort-cpu", threads: Threads = None, seed: Seed = 0,
    input_shape: InputShape = None, token_file: TokenFile = None,
) -> None:
    """Compress a checkpoint with a recipe; print a before/after table and write the output folder."""
    run_recipe(recipe, ckpt, data, output, overwrite, quiet, as_json, trust_pickle, target, threads, seed, input_shape,
               token_file)


def prune(
    ckpt: Ckpt = None,
    ratio: Annotated[list[str] | None, typer.Option("--ratio", help="KIND=R for --method magnitude, e.g. mlp=0.5 head=0.25")] = None,
    method: Annotated[str, typer.Option("--method", help="global (one ranking across kinds) | magnitude (fixed ratio per kind) | fuse-blocks (FuseGPT block removal)")] = "",
    saliency: Annotated[str, typer.Option("--saliency", help="hessian | taylor | obd | magnitude (global pruning)")] = "hessian",
    target_latency: Annotated[float | None, typer.Option("--target-latency", help="keep this fraction of the latency on --target")] = None,
    target_params: Annotated[float | None, typer.Option("--target-params", help="keep this fraction of the parameters")] = None,
    target_macs: Annotated[float | None, typer.Option("--target-macs", help="keep this fraction of the MACs")] = None,
    iterations: Annotated[int, typer.Option("--iterations", help="score-remove rounds (global pruning)")] = 4,
    target_blocks: Annotated[float | None, typer.Option("--target-blocks", help="fraction of the blocks to remove (--method fuse-blocks)")] = None,
    importance: Annotated[str, typer.Option("--importance", help="mi | block-influence | kl | hessian (--method fuse-blocks)")] = "mi",
    fusion: Annotated[str, typer.Option("--fusion", help="learned | merge | none (--method fuse-blocks)")] = "learned",
    neighbours: Annotated[int, typer.Option("--neighbours", help="kept blocks each removed block is fused into (--method fuse-blocks)")] = 7,
    finetune_steps: Annotated[int, typer.Option("--finetune-steps", help="group distillation steps per removed block (--method fuse-blocks)")] = 100,
    tune_group: Annotated[bool, typer.Option("--tune-group/--no-tune-group", help="also tune the group's own weights through low-rank updates, as FuseGPT does (--method fuse-blocks; measured better on MiniLM and a Llama)")] = True,
    recover_steps: Annotated[int, typer.Option("--recover-steps", help="distillation steps after pruning (0: none)")] = 0,
    reconstruct: Annotated[bool, typer.Option("--reconstruct/--no-reconstruct", help="refit the layers that read removed units to the original's outputs on the calibration data (least squares, before recovery)")] = True,
    data: Data = None, output: Out = None, overwrite: Overwrite = False, quiet: Quiet = False, as_json: AsJson = False,
    trust_pickle: TrustPickle = False, target: TargetOpt = "ort-cpu", threads: Threads = None, seed: Seed = 0,
    input_shape: InputShape = None, token_file: TokenFile = None,
) -> None:
    """Structured pruning: global (Hessian-aware, to a latency, parameter or MAC target), magnitude, or
    fuse-blocks (FuseGPT: remove --target-blocks of the blocks, fusing each into its neighbours)."""
    from modelpress.compress.recipe import Recipe

    goals = {k: v for k, v in (("latency", target_latency), ("params", target_params), ("macs", target_macs)) if v is not None}
    method = method or ("magnitude" if ratio else "fuse-blocks" if target_blocks is not None else "global")
    if target_blocks is not None and method != "fuse-blocks":
        raise ModelpressError("--target-blocks is for --method fuse-blocks", "add --method fuse-blocks")
    if method == "fuse-blocks":
        if ratio or "macs" in goals or len(goals) + (target_blocks is not None) > 1:
            raise ModelpressError("--method fuse-blocks removes whole blocks to one target",
                                  "give one of --target-blocks, --target-params, --target-latency")
        passes: list[dict[str, Any]] = [{"pass": "prune.fuse_blocks", "target_blocks": 0.25 if target_blocks is None else target_blocks,
                   "importance": importance, "fusion": fusion, "neighbours": neighbours,
                   "finetune_steps": finetune_steps, "tune_group": tune_group}]
        if goals:
            kind, value = next(iter(goals.items()))
            passes[0].update(target=kind, ratio=value)
    elif method == "magnitude":
        if goals:
            raise ModelpressError("--method magnitude prunes fixed --ratio per kind", "drop --target-*, or use --method global")
        ratios: dict[str, float] = {}
        for item in ratio or ["mlp=0.5", "head=0.25"]:
            kind, _, value = item.partition("=")
            try:
                ratios[kind.strip()] = float(value)
            except ValueError as exc:
                raise ModelpressError(f"--ratio {item!r} is not KIND=NUMBER", "e.g. --ratio mlp=0.5") from exc
        passes = [{"pass": "prune.magnitude", "ratios": ratios, "reconstruct": reconstruct}]
    elif method == "global":
        if ratio:
            raise ModelpressError("--ratio is for --method magnitude", "give --target-latency, --target-params or --target-macs")
        if len(goals) > 1:
            raise ModelpressError(f"give one target, not {len(goals)}", "one of --target-latency, --target-params, --target-macs")
        kind, value = next(iter(goals.items())) if goals else ("latency", 0.5)
        passes = [{"pass": "prune.global", "saliency": saliency, "target": kind, "ratio": value, "iterations": iterations,
                   "reconstruct": reconstruct}]
    else:
        raise ModelpressError(f"unknown pruning method {method!r}", "use --method global, magnitude or fuse-blocks")
    if recover_steps > 0:
        passes.append({"pass": "recover", "steps": recover_steps})
    rec = Recipe.from_dict({"name": f"prune-{method}", "passes": passes}, "modelpress prune options")
    run_recipe(rec, ckpt, data, output, overwrite, quiet, as_json, trust_pickle, target, threads, seed, input_shape,
               token_file)


def quantize(
    ckpt: Ckpt = None,
    method: Annotated[str, typer.Option("--method", help="repq | nncf | ort-static | ort-dynamic")] = "repq",
    bits: Annotated[str, typer.Option("--bits", help="w8a8, w6a6, w4a8, w4a4 (repq); w8a8 for the others")] = "w8a8",
    data: Data = None, output: Out = None, overwrite: Overwrite = False, quiet: Quiet = False, as_json: AsJson = False,
    trust_pickle: TrustPickle = False, target: TargetOpt = "ort-cpu", threads: Threads = None, seed: Seed = 0,
    input_shape: InputShape = None, token_file: TokenFile = None,
) -> None:
    """Post-training quantization only (a one-pass recipe)."""
    from modelpress.compress.recipe import Recipe

    entry: dict[str, Any] = {"pass": f"quantize.{method}"}
    if method == "repq":
        # the built-in recipe for these bits, when there is one (e.g. w8a8 -> int8's auto_channel)
        from modelpress.compress.recipe import load_recipe

        builtin = {"w8a8": "int8", "w4a8": "w4a8", "w4a4": "w4a4-repq"}.get(bits.lower())
        if builtin:
            entry = dict(load_recipe(builtin).to_dict()["passes"][0])
        entry["default"] = bits
    elif bits != "w8a8":
        raise ModelpressError(f"--method {method} quantizes to w8a8 only (got --bits {bits})", "use --method repq for other bit widths")
    rec = Recipe.from_dict({"name": f"quantize-{method}-{bits}", "passes": [entry]}, "--method/--bits")
    run_recipe(rec, ckpt, data, output, overwrite, quiet, as_json, trust_pickle, target, threads, seed, input_shape,
               token_file)


def _tensorrt_engine(onnx_path: Path, graph: Any, engine_path: Path) -> dict[str, Any]:
    """Build model.plan beside model.onnx for --target tensorrt (dynamic batch 1..32, and sequence 1..512
    for text models; the optimal shape is the default input shape)."""
    from modelpress.export.tensorrt import build_engine  # checks TensorRT's Q/DQ rules first

    spec = graph.input_spec
    opt = {n: tuple(t.shape) for n, t in graph.example_inputs(1).items()}
    shapes = {}
    for name, shape in opt.items():
        lo, hi = list(shape), list(shape)
        lo[0], hi[0] = 1, 32
        if spec.kind == "text" and len(shape) > 1:
            lo[1], hi[1] = 1, 512
        shapes[name] = (tuple(lo), shape, tuple(hi))
    build_engine(onnx_path, engine_path, shapes=shapes)
    return {"path": engine_path.name, "bytes": engine_path.stat().st_size,
            "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}}
