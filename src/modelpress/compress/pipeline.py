"""Pipeline: graph-stage passes, one export, ONNX-stage passes, then evaluation and measurement."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.compress.recipe import Recipe
from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.passes import Context

# below this mean cosine to the original, the report warns that the compressed model drifted far
LOW_FIDELITY = 0.95
# a QDQ export vs its torch fake-quant model: integer codes match until a rounding tie, then drift slightly
QDQ_MIN_COSINE = 0.99


@dataclass
class PipelineResult:
    graph: ModelGraph
    onnx_path: Path
    baseline_onnx: Path
    report: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """Runs a Recipe over a ModelGraph inside ``ctx.workdir``."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    def run(self, graph: ModelGraph, ctx: Context, *, measure: bool = True) -> PipelineResult:
        from modelpress.bench import candidate_timer
        from modelpress.export import export_onnx

        rep = ctx.reporter
        workdir = Path(ctx.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        ctx.reference = ctx.reference or graph
        started = time.perf_counter()
        pass_log: list[dict] = []
        current = graph
        for p in [p for p in self.recipe.passes if p.stage == "graph"]:
            t0 = time.perf_counter()
            rep.log(f"[bold]pass[/bold] {p.name}")
            result = p.apply(current, ctx)
            if result.graph is None:
                raise RuntimeError(f"graph pass {p.name} returned no graph")
            current = result.graph
            pass_log.append({"pass": p.name, "stage": "graph", "seconds": time.perf_counter() - t0, **result.metrics})

        export_cfg = self.recipe.spec.export
        def export(g: ModelGraph, name: str, optimize: str) -> Any:
            return export_onnx(
                g.module, g.input_spec, workdir / name, optimize=optimize, opset=export_cfg.opset,
                timer=candidate_timer(ctx.target) if ctx.target is not None else None, reporter=rep,
            )

        with rep.step("exporting the original model to ONNX"):
            base = export(graph, "original.onnx", export_cfg.optimize)
        if current is graph:
            exported = base
        elif _is_fake_quant(current.module):
            exported = self._export_quantized(current, workdir / "compressed.int8.onnx", ctx)
        else:
            # the original's timing already chose the graph optimization for this architecture: reuse it
            choice = base.optimization if export_cfg.optimize == "auto" else export_cfg.optimize
            with rep.step(f"exporting the compressed model to ONNX ({choice})"):
                try:
                    exported = export(current, "compressed.onnx", choice)
                except ModelpressError:
                    if choice == "none":
                        raise
                    rep.log(f"optimization {choice!r} failed on the compressed model; exporting without it")
                    exported = export(current, "compressed.onnx", "none")
        onnx_path = Path(exported.path)
        for p in [p for p in self.recipe.passes if p.stage == "onnx"]:
            t0 = time.perf_counter()
            rep.log(f"[bold]pass[/bold] {p.name}")
            result = p.apply(onnx_path, ctx)
            if result.onnx_path is None:
                raise RuntimeError(f"onnx pass {p.name} returned no file")
            onnx_path = Path(result.onnx_path)
            pass_log.append({"pass": p.name, "stage": "onnx", "seconds": time.perf_counter() - t0, **result.metrics})

        report: dict[str, Any] = {
            "model": graph.name,
            "recipe": self.recipe.to_dict(),
            "passes": pass_log,
            "export": {"original": _export_info(base), "compressed": _export_info(exported)},
        }
        report["before"] = {"parameters": graph.num_parameters(), "file_bytes": _size(Path(base.path))}
        report["after"] = {"parameters": current.num_parameters(), "file_bytes": _size(onnx_path)}
        if ctx.task is not None and ctx.data is not None:
            simulated = current if getattr(exported, "log_export", None) else None
            report.update(self._evaluate(graph, Path(base.path), onnx_path, ctx, simulated))
        if measure and ctx.target is not None:
            report["latency"] = self._measure(graph, Path(base.path), onnx_path, ctx)
        report["seconds"] = time.perf_counter() - started
        return PipelineResult(current, onnx_path, Path(base.path), report)

    def _export_quantized(self, graph: ModelGraph, path: Path, ctx: Context) -> QuantizedExport:
        """Lower a fake-quant graph to QDQ ONNX (integer kernels in ONNX Runtime) and check it against torch.

        Fake-quant models round at every quantizer, so a float rounding tie can flip one integer code and
        the difference grows through the layers: the check is on cosine, not on exact equality.
        Log2 / log-sqrt2 probability quantizers have no QDQ form: they export as 8-bit uniform QDQ (the
        nearest form with integer kernels) unless that strays from the torch simulation, then as an
        exact float-op simulation; the choice and both checks go into the report.
        """
        from modelpress.quantize.qdq import (
            export_qdq,
            integer_kernel_count,
            log_quantizer_count,
            ort_kernels,
            verify_qdq,
        )
        from modelpress.quantize.quantizers import LOG_FORMS

        t0 = time.perf_counter()
        text = graph.input_spec.kind == "text"
        example = graph.example_inputs(2, 16 if text else None)
        batches = [graph.example_inputs(2, 24 if text else None, seed=s) for s in (1, 2)]
        if not text:
            example = example[graph.input_spec.names[0]]
            batches = [b[graph.input_spec.names[0]] for b in batches]
        logs = log_quantizer_count(graph.module)
        # TensorRT wants standard QDQ with signed activations; ONNX Runtime's CPU kernels want U8S8 + its fusions
        tensorrt = getattr(ctx.target, "name", None) == "tensorrt"
        flavour = {"activation_dtype": "int8", "ort_fusion": False} if tensorrt else {}
        forms = ["uniform", "simulate"] if logs else ["uniform"]
        tried: dict[str, dict] = {}
        with ctx.reporter.step("exporting the quantized model to QDQ ONNX"):
            for form in forms:
                export_qdq(graph.module, example, path, input_names=graph.input_spec.names,
                           dynamic_axes=graph.input_spec.dynamic_axes(), log_form=form, **flavour)
                check = tried[form] = verify_qdq(path, graph.module, batches)
                if check["min_cosine"] >= QDQ_MIN_COSINE:
                    break
            kernels = ort_kernels(path, workdir=path.parent)
        if check["min_cosine"] < QDQ_MIN_COSINE:
            raise ModelpressError(
                f"the INT8 ONNX export disagrees with the quantized torch model (cosine {check['min_cosine']:.4f})",
                "report this with the recipe; try fewer low-bit layers",
            )
        if tensorrt:
            from modelpress.export.tensorrt import tensorrt_problems

            problems = tensorrt_problems(path)
            if problems:
                raise ModelpressError(f"the quantized export is not TensorRT-ready: {problems[0]}",
                                      "leave quantize.repq's symmetric_activations at auto (or true) for --target tensorrt")
        log_export = None
        if logs:
            log_export = {"quantizers": logs, "form": form, "description": LOG_FORMS[form], "checks": tried}
            ctx.reporter.log(f"log2 attention probabilities have no ONNX QDQ form: exported as {form!r} "
                             f"(cosine to the torch simulation {check['min_cosine']:.4f})")
        return QuantizedExport(path, "qdq", check, dict(kernels), integer_kernel_count(kernels),
                               time.perf_counter() - t0, log_export)

    def _evaluate(
        self, graph: ModelGraph, base: Path, final: Path, ctx: Context, simulated: ModelGraph | None = None
    ) -> dict:
        """Quality of the original and final ONNX files against the original torch model; with
        ``simulated`` (a fake-quant model whose export had to approximate it), that model's too, so the
        report shows what the export form costs."""
        from modelpress.data import onnx_runner, torch_runner

        threads = getattr(ctx.target, "threads", None)
        reference = torch_runner(graph.module, graph.input_spec.names)
        split = ctx.evaluation
        with ctx.reporter.step(f"evaluating on {len(split)} held-out samples"):
            ref = ctx.task.reference_cache(reference, split)  # the original runs once
            before = ctx.task.evaluate(onnx_runner(base, threads=threads), None, split, reference_outputs=ref)
            after = ctx.task.evaluate(onnx_runner(final, threads=threads), None, split, reference_outputs=ref)
            if simulated is not None:
                sim = ctx.task.evaluate(torch_runner(simulated.module, graph.input_spec.names), None, split,
                                        reference_outputs=ref)
        quality = {"before": before, "after": after, "samples": len(split)}
        if simulated is not None:
            quality["torch_simulation"] = sim
        if after.get("fidelity_mean", 1.0) < LOW_FIDELITY:
            ctx.reporter.log(f"[yellow]warning[/yellow]: fidelity {after['fidelity_mean']:.3f} is low")
        return {"quality": quality}

    def _measure(self, graph: ModelGraph, base: Path, final: Path, ctx: Context) -> dict:
        from modelpress.bench import measure

        variants = {"original": base} if base == final else {"original": base, "compressed": final}
        with ctx.reporter.step("measuring latency (interleaved rounds)"):
            bench = measure(variants, graph.input_spec, ctx.target, baseline="original", reporter=ctx.reporter)
        out = bench.to_dict()
        shapes = out.get("variants", {}).get("compressed", {}).get("shapes", [])
        slower = [s for s in shapes if s.get("speedup") is not None and s["speedup"] < 1.0]
        if shapes and len(slower) == len(shapes):
            ratios = ", ".join(f"{s['speedup']:.2f}x" for s in slower)
            msg = (f"the compressed model is slower than the original on {ctx.target.name} "
                   f"({ratios}); on very small models the per-op overhead (e.g. quantize/dequantize) can "
                   "outweigh the savings: keep the original, or try another recipe")
            ctx.reporter.log(f"[yellow]warning[/yellow]: {msg}")
            out["warning"] = msg
        return out


@dataclass
class QuantizedExport:
    path: Path
    optimization: str
    verification: dict
    kernels: dict
    integer_kernels: int
    export_seconds: float
    log_export: dict | None = None  # how log2 probability quantizers were exported (None: there were none)


def _is_fake_quant(module: Any) -> bool:
    from modelpress.quantize import is_fake_quant

    return is_fake_quant(module)


def _size(path: Path) -> int:
    from modelpress.export.files import onnx_file_size

    return onnx_file_size(path)


def _export_info(result: Any) -> dict:
    info = {}
    keys = ("optimization", "candidates", "file_size_bytes", "export_seconds", "kernels", "integer_kernels",
            "log_export")
    for key in keys:
        if hasattr(result, key):
            info[key] = getattr(result, key)
    v = getattr(result, "verification", None)
    if isinstance(v, dict):
        info["verification"] = v
    elif v is not None:
        info["verification"] = {k: getattr(v, k) for k in ("max_abs_err", "cosine", "ok") if hasattr(v, k)}
    return info


def require(condition: bool, problem: str, hint: str) -> None:
    if not condition:
        raise ModelpressError(problem, hint)
