"""`modelpress fuse CKPT_A CKPT_B [...]`: optimal-transport fusion (the ``fuse.ot`` merge pass) into the first
checkpoint's architecture, optionally narrower (``--width mlp=0.5``), with label-free recovery; writes the fused
model, its verified ONNX and a report (parents, ensemble, vanilla averaging, fused: one-shot and recovered)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from modelpress.cli.common import (
    AsJson,
    Data,
    Out,
    Overwrite,
    Quiet,
    Seed,
    TrustPickle,
    check_output_dir,
    jsonable,
    load_graph,
    print_json,
    print_rich,
    reporter,
)
from modelpress.errors import ModelpressError


def parse_widths(items: list[str] | None) -> dict[str, int | float]:
    """``["mlp=0.5", "head=2"]`` -> {"mlp": 0.5, "head": 2}: a fraction (with a decimal point) or a whole unit
    count; a short error for anything else."""
    out: dict[str, int | float] = {}
    for item in items or []:
        kind, sep, value = item.partition("=")
        try:
            out[kind.strip()] = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ModelpressError(f"--width {item!r} is not KIND=NUMBER", "e.g. --width mlp=0.5")
    return out


def fuse(
    ckpts: Annotated[list[str], typer.Argument(help="Two or more checkpoints of one architecture; the first is the anchor.")],
    alignment: Annotated[str, typer.Option("--alignment", help="hard (exact OT) | soft (Sinkhorn)")] = "hard",
    cost: Annotated[str, typer.Option("--cost", help="acts (activations on the data) | weights")] = "acts",
    qk: Annotated[str, typer.Option("--qk", help="separate | shared | per-head")] = "per-head",
    reg: Annotated[float, typer.Option("--reg", help="Sinkhorn regularization for --alignment soft (relative to the largest cost)")] = 0.01,
    width: Annotated[list[str] | None, typer.Option("--width", help="narrower target, KIND=FRACTION (at most 1) or KIND=UNITS: mlp=0.5 head=2 embedding=0.75")] = None,
    recover_steps: Annotated[int, typer.Option("--recover-steps", help="distillation steps from the parents' ensemble (0: none)")] = 0,
    samples: Annotated[int, typer.Option("--samples", help="calibration samples for activation costs")] = 200,
    data: Data = None, output: Out = None, overwrite: Overwrite = False, quiet: Quiet = False, as_json: AsJson = False,
    trust_pickle: TrustPickle = False, seed: Seed = 0,
) -> None:
    """Fuse two or more models with optimal transport (Transformer Fusion with Optimal Transport)."""
    from modelpress.compress.pipeline import Pipeline
    from modelpress.compress.recipe import Recipe
    from modelpress.fuse.passes import FuseOTConfig

    if len(ckpts) < 2:
        raise ModelpressError(f"fusion needs two or more checkpoints, got {len(ckpts)}", "modelpress fuse CKPT_A CKPT_B [...]")
    config: dict[str, Any] = {"pass": "fuse.ot", "others": list(ckpts[1:]), "alignment": alignment, "cost": cost,
                              "qk": qk, "reg": reg, "width": parse_widths(width), "recover_steps": recover_steps, "samples": samples}
    try:
        FuseOTConfig(**{k: v for k, v in config.items() if k != "pass"}).check()
    except ValueError as exc:  # pydantic's validation error
        raise ModelpressError(f"bad fusion option: {str(exc).splitlines()[-2].strip() if len(str(exc).splitlines()) > 1 else exc}",
                              "see `modelpress fuse --help`") from None
    recipe = Recipe.from_dict({"name": "fuse-ot", "passes": [config]}, "modelpress fuse options")
    if output is not None:
        check_output_dir(output, overwrite)
    rep = reporter(quiet or as_json)
    graph = load_graph(ckpts[0], trust_pickle, None, rep, seed)
    out = output or Path(f"fused-{graph.name}")
    if output is None:
        check_output_dir(out, overwrite)
    from modelpress.compress.report import render_markdown
    from modelpress.data import infer_task, load_data
    from modelpress.models import saving
    from modelpress.models.saving import staged_dir
    from modelpress.passes import Context

    task_data = load_data(data, graph.input_spec, graph.tokenizer, seed=seed, n_calibration=samples)
    with staged_dir(out, overwrite=overwrite) as tmp:
        ctx = Context(workdir=tmp / "work", task=infer_task(graph.input_spec, graph.module), data=task_data,
                      seed=seed, reporter=rep)
        result = Pipeline(recipe).run(graph, ctx, measure=False)
        with rep.step("writing the output folder"):
            saving.write_into(result.graph, tmp)
            from modelpress.export.files import copy_onnx

            copy_onnx(result.onnx_path, tmp / "model.onnx")  # with its external data, if any
            report = result.report
            report["fusion"] = report["passes"][0]
            report["data"] = getattr(task_data, "description", str(data))
            report["task"] = ctx.task.name
            report["output"] = str(out)
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=jsonable))
            (tmp / "report.md").write_text(render_markdown(report) + "\n" + "\n".join(fusion_markdown(report)) + "\n")
            shutil.rmtree(tmp / "work", ignore_errors=True)
    if as_json:
        print_json(report)
    else:
        print_rich(fusion_table(report), f"wrote {out}/ (model.onnx, model.safetensors, report.json, report.md)")


def _rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    quality = report.get("fusion", {}).get("quality") or {}
    keys = [k for k in ("accuracy", "agreement", "fidelity_mean", "top1_agreement") if k in quality.get("ensemble", {})]
    rows = []
    for name, q in quality.get("parents", {}).items():
        rows.append([f"parent {name}"] + [f"{q[k]:.4f}" for k in keys] + ["-"])
    if "ensemble" in quality:
        rows.append(["ensemble"] + [f"{quality['ensemble'][k]:.4f}" for k in keys] + ["-"])
    for name in ("vanilla", "fused"):
        if name in quality:
            one, rec = quality[name]["one_shot"], quality[name].get("recovered")
            rows.append([f"{name} (one-shot)"] + [f"{one[k]:.4f}" for k in keys] + ["-"])
            if rec:
                rows.append([f"{name} (recovered)"] + [f"{rec[k]:.4f}" for k in keys] + ["-"])
    return keys, rows


def fusion_table(report: dict[str, Any]):  # noqa: ANN201 - rich.table.Table
    from rich.table import Table

    keys, rows = _rows(report)
    table = Table(title=f"fusion of {', '.join(report.get('fusion', {}).get('models', []))} (vs the anchor, held-out data)")
    for col in ("model", *keys):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in rows:
        table.add_row(*row[: 1 + len(keys)])
    return table


def fusion_markdown(report: dict[str, Any]) -> list[str]:
    keys, rows = _rows(report)
    lines = ["## Fusion", "", "| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    return lines + ["| " + " | ".join(r[: 1 + len(keys)]) + " |" for r in rows]
