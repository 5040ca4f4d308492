"""The `modelpress` command: compress, prune, quantize, inspect, export, bench, recipes."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from modelpress.errors import ModelpressError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make trained neural networks smaller and faster, and measure what they gained.",
)

Ckpt = Annotated[
    str | None,
    typer.Argument(help="hf:DIR, a HF folder, a saved modelpress folder, timm:NAME, torchvision:NAME, pkg.mod:factory, or FILE.pt; default: all-MiniLM-L6-v2"),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading pickled .pt/.pth modules (runs code).")]
Data = Annotated[str | None, typer.Option("--data", help="digits | text:FILE | images:DIR | tensors:FILE.npz")]
Out = Annotated[Path | None, typer.Option("--output", "-o", help="Output directory (default: ./compressed-NAME).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
TargetOpt = Annotated[str, typer.Option("--target", help="ort-cpu | edge")]
Threads = Annotated[int | None, typer.Option("--threads", help="Threads for ONNX Runtime (default: the target's).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
InputShape = Annotated[str | None, typer.Option("--input-shape", help="C,H,W for modules that do not say.")]


def _reporter(quiet: bool):  # noqa: ANN202
    from modelpress.progress import Reporter

    return Reporter(quiet=quiet)


def _console():  # noqa: ANN202
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)  # pipes and logs: do not squeeze tables


def _load(ckpt: str | None, trust_pickle: bool, input_shape: str | None, reporter) -> Any:  # noqa: ANN001
    from modelpress.models import load

    shape = None
    if input_shape:
        try:
            shape = tuple(int(x) for x in input_shape.split(","))
        except ValueError as exc:
            raise ModelpressError(f"--input-shape {input_shape!r} is not a list of integers", "e.g. --input-shape 3,224,224") from exc
    with reporter.step(f"loading {ckpt or 'the default model (all-MiniLM-L6-v2)'}"):
        return load(ckpt, trust_pickle=trust_pickle, input_shape=shape)


def _prepare_output(out: Path | None, default_name: str, overwrite: bool) -> Path:
    out = out or Path(f"compressed-{default_name}")
    if out.exists() and not overwrite:
        raise ModelpressError(f"output {out} already exists", "pass --overwrite to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise ModelpressError(f"output {out} exists and is not a directory", "choose another -o")
    return out


def run_recipe(
    recipe_ref: Any, ckpt: str | None, data: str | None, out: Path | None, overwrite: bool, quiet: bool,
    as_json: bool, trust_pickle: bool, target: str, threads: int | None, seed: int, input_shape: str | None,
) -> None:
    """Shared body of compress/prune/quantize: load, run the pipeline, write the output folder atomically."""
    from modelpress.bench import get_target
    from modelpress.compress.pipeline import Pipeline
    from modelpress.compress.recipe import Recipe, load_recipe
    from modelpress.compress.report import render_markdown, render_table
    from modelpress.models import saving
    from modelpress.passes import Context

    recipe = recipe_ref if isinstance(recipe_ref, Recipe) else load_recipe(recipe_ref)
    tgt = get_target(target, threads=threads)
    rep = _reporter(quiet)
    graph = _load(ckpt, trust_pickle, input_shape, rep)
    out = _prepare_output(out, f"{graph.name}-{recipe.name}", overwrite)
    from modelpress.data import infer_task, load_data

    task_data = load_data(data, graph.input_spec, graph.tokenizer, seed=seed, n_calibration=128)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        ctx = Context(
            workdir=tmp / "work", task=infer_task(graph.input_spec, graph.module), data=task_data,
            target=tgt, seed=seed, reporter=rep,
        )
        result = Pipeline(recipe).run(graph, ctx)
        with rep.step("writing the output folder"):
            saving.write_into(result.graph, tmp)
            shutil.copyfile(result.onnx_path, tmp / "model.onnx")
            report = result.report
            if tgt.name == "tensorrt":
                report["tensorrt_engine"] = _tensorrt_engine(tmp / "model.onnx", graph, tmp / "model.plan")
            report["data"] = getattr(task_data, "description", str(data))
            report["task"] = ctx.task.name
            report["output"] = str(out)
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable))
            (tmp / "report.md").write_text(render_markdown(report))
            shutil.rmtree(tmp / "work", ignore_errors=True)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=_jsonable))
    else:
        _console().print(render_table(report))
        _console().print(f"wrote {out}/ (model.onnx, model.safetensors, report.json, report.md)")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


@app.command()
def compress(
    ckpt: Ckpt = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Built-in recipe name or YAML file.")] = "default",
    data: Data = None, output: Out = None, overwrite: Overwrite = False, quiet: Quiet = False, as_json: AsJson = False,
    trust_pickle: TrustPickle = False, target: TargetOpt = "ort-cpu", threads: Threads = None, seed: Seed = 0,
    input_shape: InputShape = None,
) -> None:
    """Compress a checkpoint with a recipe; print a before/after table and write the output folder."""
    run_recipe(recipe, ckpt, data, output, overwrite, quiet, as_json, trust_pickle, target, threads, seed, input_shape)


@app.command()
def prune(
    ckpt: Ckpt = None,
    ratio: Annotated[list[str] | None, typer.Option("--ratio", help="KIND=R, e.g. mlp=0.5 head=0.25")] = None,
    method: Annotated[str, typer.Option("--method", help="magnitude")] = "magnitude",
    data: Data = None, output: Out = None, overwrite: Overwrite = False, quiet: Quiet = False, as_json: AsJson = False,
    trust_pickle: TrustPickle = False, target: TargetOpt = "ort-cpu", threads: Threads = None, seed: Seed = 0,
    input_shape: InputShape = None,
) -> None:
    """Structured pruning only (a one-pass recipe)."""
    from modelpress.compress.recipe import Recipe

    ratios: dict[str, float] = {}
    for item in ratio or ["mlp=0.5", "head=0.25"]:
        kind, _, value = item.partition("=")
        try:
            ratios[kind.strip()] = float(value)
        except ValueError as exc:
            raise ModelpressError(f"--ratio {item!r} is not KIND=NUMBER", "e.g. --ratio mlp=0.5") from exc
    rec = Recipe.from_dict({"name": f"prune-{method}", "passes": [{"pass": f"prune.{method}", "ratios": ratios}]}, "--ratio")
    run_recipe(rec, ckpt, data, output, overwrite, quiet, as_json, trust_pickle, target, threads, seed, input_shape)


@app.command()
def quantize(
    ckpt: Ckpt = None,
    method: Annotated[str, typer.Option("--method", help="repq | nncf | ort-static | ort-dynamic")] = "repq",
    bits: Annotated[str, typer.Option("--bits", help="w8a8, w6a6, w4a8, w4a4 (repq); w8a8 for the others")] = "w8a8",
    data: Data = None, output: Out = None, overwrite: Overwrite = False, quiet: Quiet = False, as_json: AsJson = False,
    trust_pickle: TrustPickle = False, target: TargetOpt = "ort-cpu", threads: Threads = None, seed: Seed = 0,
    input_shape: InputShape = None,
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
    run_recipe(rec, ckpt, data, output, overwrite, quiet, as_json, trust_pickle, target, threads, seed, input_shape)


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


@app.command()
def inspect(
    ckpt: Ckpt = None, quiet: Quiet = False, as_json: AsJson = False, trust_pickle: TrustPickle = False,
    input_shape: InputShape = None,
) -> None:
    """Per block: heads, head dim, MLP width; embedding width; parameters; MACs at the default input shape."""
    from modelpress.compress.report import render_inspect

    graph = _load(ckpt, trust_pickle, input_shape, _reporter(quiet or as_json))
    summary = graph.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=_jsonable))
    else:
        _console().print(render_inspect(summary))


@app.command()
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

    if output.exists() and not overwrite:
        raise ModelpressError(f"output {output} already exists", "pass --overwrite to replace it")
    rep = _reporter(quiet or as_json)
    graph = _load(ckpt, trust_pickle, input_shape, rep)
    result = export_onnx(
        graph.module, graph.input_spec, output, optimize=optimize, timer=candidate_timer(get_target(target, threads)), reporter=rep,
    )
    info = {"path": str(output), "optimization": getattr(result, "optimization", None),
            "file_size_bytes": getattr(result, "file_size_bytes", None)}
    v = getattr(result, "verification", None)
    if v is not None:
        info["max_abs_err"], info["cosine"] = v.max_abs_err, v.cosine
    typer.echo(json.dumps(info, indent=2, default=_jsonable) if as_json else
               f"wrote {output} ({info['optimization']}; max abs err {info.get('max_abs_err', float('nan')):.2e})")


@app.command()
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

    rep = _reporter(quiet or as_json)
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
            graph = _load(model, trust_pickle, input_shape, rep)
            tmp = Path(tempfile.mkdtemp(prefix="modelpress-bench-"))
            path = Path(export_onnx(graph.module, graph.input_spec, tmp / "model.onnx", optimize="none", reporter=rep).path)
            spec, name = graph.input_spec, graph.name
        result = measure({name: path}, spec, tgt, rounds=rounds, reporter=rep, batch_sizes=batch or None,
                         seq_lens=seq or None)
        out = output or Path(f"bench-{name}.json")
        result.write_json(out)
        if as_json:
            typer.echo(json.dumps(result.to_json(), indent=2, default=_jsonable))
        else:
            _console().print(result.to_table())
            _console().print(f"wrote {out}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@app.command()
def recipes(as_json: AsJson = False) -> None:
    """List the built-in recipes."""
    from modelpress.compress.recipe import builtin_recipes, load_recipe

    rows = []
    for name in sorted(builtin_recipes()):
        r = load_recipe(name)
        rows.append({"name": name, "passes": [p.name for p in r.passes], "description": " ".join(r.spec.description.split())})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="built-in recipes")
    for col in ("name", "passes", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], ", ".join(r["passes"]) or "(export only)", r["description"])
    _console().print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print a short message and exit 2, without a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except ModelpressError as exc:
        print(f"error: {exc.problem}", file=sys.stderr)
        if exc.hint:
            print(f"  -> {exc.hint}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors and the unexpected
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if os.environ.get("MODELPRESS_DEBUG"):
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}", file=sys.stderr)
        print("  -> this looks like a modelpress bug; rerun with MODELPRESS_DEBUG=1 for the traceback", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
