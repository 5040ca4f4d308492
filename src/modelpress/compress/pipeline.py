"""Pipeline: a merge pass (when given several models), graph passes, one export, ONNX passes, then
evaluation and measurement of the result against the original."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.compress.recipe import Recipe
from modelpress.compress.report import review, speed_change
from modelpress.errors import ModelpressError
from modelpress.export.decoder import is_causal_lm
from modelpress.graph import ModelGraph
from modelpress.passes import Context, Exporter, as_graph_list
from modelpress.system import release_freed_memory

# below these agreements with the original, the report warns that the compressed model drifted far:
# mean embedding cosine (encoders), next-token top-1 agreement (language models), top-1 agreement and mean
# logit cosine (classifiers)
LOW_QUALITY = {"fidelity_mean": 0.95, "top1_agreement": 0.9, "agreement": 0.9, "logit_cosine": 0.9}


@dataclass
class PipelineResult:
    graph: ModelGraph
    onnx_path: Path
    baseline_onnx: Path
    report: dict[str, Any] = field(default_factory=dict)
    decoder: Any = None  # causal LMs: the compressed model's cached decoder (export.decoder.DecoderExport)


class Pipeline:
    """Runs a Recipe over one ModelGraph (or several, merged by the recipe's first pass) in ``ctx.workdir``."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    def run(self, graphs: ModelGraph | list[ModelGraph], ctx: Context, *, measure: bool = True) -> PipelineResult:
        """Merge (if the recipe starts with a merge pass), run the graph passes, export once (with the
        exporter the last pass that set one asked for), run the ONNX passes, evaluate and measure.

        The first graph is the original the result is compared with (``ctx.reference`` unless set)."""
        from modelpress.bench import candidate_timer
        from modelpress.export import export_onnx

        inputs = as_graph_list(graphs)
        merges = [p for p in self.recipe.passes if p.kind == "merge"]
        if len(inputs) > 1 and not merges:
            raise ModelpressError(f"{len(inputs)} models given, but recipe {self.recipe.name!r} has no merge pass",
                                  "give one model, or a recipe that starts with a merge pass (fusion)")
        if merges and len(inputs) < 2 and not _merge_brings_its_own(merges[0]):
            raise ModelpressError(f"recipe {self.recipe.name!r} merges models, but one model was given",
                                  "give two or more models")
        graph = inputs[0]
        rep = ctx.reporter
        workdir = Path(ctx.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        ctx.reference = ctx.reference or graph
        if ctx.latency_model is None and any(getattr(p, "needs_latency_model", False) for p in self.recipe.passes):
            from modelpress.bench import build_latency_table

            with rep.step("latency table on the target (measured once, then cached)"):
                ctx.latency_model = build_latency_table(graph, ctx.target or "ort-cpu", reporter=rep)
        export_cfg = self.recipe.spec.export
        timer = candidate_timer(ctx.target) if ctx.target is not None else None

        def export(g: ModelGraph, name: str, optimize: str) -> Any:
            return export_onnx(
                g.module, g.input_spec, workdir / name, optimize=optimize, opset=export_cfg.opset,
                timer=timer, reporter=rep,
            )

        started = time.perf_counter()
        # the original first, while it is the only model in memory: its export candidates (ONNX Runtime sessions,
        # the transformer optimizer's copies) then never stack on the compressed model's weights
        with rep.step("exporting the original model to ONNX"):
            base = export(graph, "original.onnx", export_cfg.optimize)
        evaluates = ctx.task is not None and ctx.data is not None
        before: dict | None = None
        if evaluates:  # now too: the original's session then never sits beside the compressed model
            with rep.step(f"evaluating the original's export on {len(ctx.evaluation)} held-out samples"):
                ctx.reference_outputs()  # torch's, then its mapped weights leave the resident set (below)
                graph.drop_mapped_weights()
                before = ctx.evaluate(Path(base.path)).metrics
        pass_log: list[dict] = []
        exporter: Exporter | None = None
        lowering: Any = None  # the quantized layers' lowering into the cached decoder
        current: Any = inputs if merges else graph
        for p in [p for p in self.recipe.passes if p.kind in ("merge", "graph")]:
            t0 = time.perf_counter()
            rep.log(f"[bold]pass[/bold] {p.name}")
            result = p.apply(current, ctx)
            if result.graph is None:
                raise RuntimeError(f"{p.kind} pass {p.name} returned no graph")
            current = result.graph
            exporter = result.exporter or exporter  # a later float pass keeps the quantized lowering
            lowering = getattr(result, "decoder_lowering", None) or lowering
            pass_log.append({"pass": p.name, "stage": p.kind, "seconds": time.perf_counter() - t0, **result.metrics})

        if current is not graph:
            # the original's torch weights are read again only by a causal LM's decoder export (its reference
            # outputs are computed): its weights mapped from the checkpoint file leave the resident set, or a
            # full copy of them sits under the export, evaluation and timing sessions of the compressed model
            graph.drop_mapped_weights()
            # the graphs' cached discovery (the traced program, dependency propagation, groups: ~100 MiB on
            # BERT-base) is not read below; a later query traces again
            graph.invalidate()
            if isinstance(current, ModelGraph):
                current.invalidate()
                # its weights into files of the work folder, mapped: read by its export, evaluation and decoder
                # export, then off the resident set under the ONNX Runtime sessions (the export's candidates, the
                # timing), where a second full copy of the model otherwise sits
                try:
                    current.spill_weights(workdir / "compressed-weights")
                except OSError as exc:  # a full disk: the weights stay in memory
                    rep.log(f"compressed weights kept in memory ({exc})")
            release_freed_memory()
        if current is graph:
            exported = base
        elif exporter is not None:
            exported = exporter(current, workdir / "compressed.int8.onnx", ctx)
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
        for p in [p for p in self.recipe.passes if p.kind == "onnx"]:
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
        if len(inputs) > 1:
            report["inputs"] = [g.name for g in inputs]
        report["before"] = {"parameters": graph.num_parameters(), "file_bytes": _size(Path(base.path))}
        report["after"] = {"parameters": current.num_parameters(), "file_bytes": _size(onnx_path)}
        if evaluates:
            simulated = current if getattr(exported, "log_export", None) else None
            report.update(self._evaluate(before, onnx_path, ctx, simulated))
        if measure and ctx.target is not None:
            if current is not graph and isinstance(current, ModelGraph):
                current.drop_mapped_weights()  # read by the evaluation (a simulated export runs it)
            report["latency"] = self._measure(graph, Path(base.path), onnx_path, ctx)
        decoder = None
        if is_causal_lm(graph.module):  # LM users generate: the cached decoders, and their generation speed
            decoders = self._decoders(graph, current, workdir, ctx, report, quantized=exporter is not None,
                                      lowering=lowering)
            decoder = decoders.get("compressed")
            if measure and ctx.target is not None:
                report["generation"] = self._measure_generation(decoders, ctx)
        report.update(review(report))  # warnings (slower, larger) and what to try; the CLI shows them
        report["seconds"] = time.perf_counter() - started
        return PipelineResult(current, onnx_path, Path(base.path), report, decoder)

    def _decoders(self, graph: ModelGraph, current: ModelGraph, workdir: Path, ctx: Context,
                  report: dict[str, Any], *, quantized: bool = False, lowering: Any = None) -> dict[str, Any]:
        """The original's and the compressed model's decoders with a key-value cache, each verified against its
        own torch model by greedy generation; the compressed one through its passes' ``lowering`` when they
        gave one (packed weight-only: MatMulNBits). A compressed model whose decoder cannot be exported or
        verified (a quantized form the cached export does not lower yet) is reported, not written."""
        from modelpress.export.decoder import export_decoder

        opset = self.recipe.spec.export.opset
        info: dict[str, Any] = {}
        decoders: dict[str, Any] = {}
        for name, g in (("original", graph), ("compressed", current)):
            if name == "compressed" and current is graph:
                decoders[name], info[name] = decoders["original"], info["original"]
                break
            try:
                with ctx.reporter.step(f"exporting the {name} model's decoder with a key-value cache"):
                    decoders[name] = export_decoder(g.module, workdir / f"decoder-{name}.onnx", opset=opset,
                                                    lowering=lowering if name == "compressed" else None)
                info[name] = decoders[name].to_dict()
                if name == "original" and current is not graph:
                    graph.drop_mapped_weights()  # read again for its decoder: off the resident set again
            except Exception as exc:  # a compressed form the cached export does not lower yet: reported, not fatal
                if name == "original" and not isinstance(exc, ModelpressError):
                    raise
                info[name] = {"error": exc.problem if isinstance(exc, ModelpressError) else
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
                ctx.reporter.log(f"[yellow]no cached decoder for the {name} model[/yellow]: {info[name]['error']}")
        if lowering is not None and "compressed" in decoders:
            info["compressed"]["form"] = f"the quantized layers lowered by the pass: {lowering.name}"
        elif quantized and "compressed" in decoders:
            info["compressed"]["form"] = ("the quantized torch model traced with its cache: fake-quant ops on float "
                                          "weights, not model.onnx's integer-kernel lowering")
        report["decoder"] = info
        return decoders

    def _measure_generation(self, decoders: dict[str, Any], ctx: Context) -> dict:
        from modelpress.bench.generation import measure_generation

        if "original" not in decoders:
            return {}
        variants = {n: d.path for n, d in decoders.items() if n == "original" or d is not decoders["original"]}
        with ctx.reporter.step("measuring generation (prefill, decode tokens/s; interleaved rounds)"):
            out = measure_generation(variants, ctx.target, layout=decoders["original"].layout,
                                     batch_sizes=list(ctx.target.batch_sizes), baseline="original",
                                     reporter=ctx.reporter)
        return out.to_dict()

    def _evaluate(self, before: dict, final: Path, ctx: Context, simulated: ModelGraph | None = None) -> dict:
        """Quality of the final ONNX file against the original torch model, beside ``before`` (the original's
        own export's); with ``simulated`` (a fake-quant model whose export had to approximate it), that model's
        too, so the report shows what the export form costs."""
        with ctx.reporter.step(f"evaluating on {len(ctx.evaluation)} held-out samples"):
            after = ctx.evaluate(final).metrics
            if simulated is not None:
                sim = ctx.evaluate(simulated, torch_only=True).metrics
        quality = {"before": before, "after": after, "samples": len(ctx.evaluation)}
        if simulated is not None:
            quality["torch_simulation"] = sim
        low = [f"{key} {after[key]:.3f} (below {floor})" for key, floor in LOW_QUALITY.items()
               if key in after and after[key] < floor]
        noise = [f"{key} {before[key]:.3f}" for key, floor in LOW_QUALITY.items() if key in before and before[key] < floor]
        if noise:  # the original's own export disagrees with torch: its outputs are rounding noise
            quality["warning"] = (f"the original model's own ONNX export agrees poorly with torch ({', '.join(noise)}): "
                                  "its outputs are rounding noise (vanishing activations, random weights?), so these "
                                  "quality numbers mean little")
            ctx.reporter.log(f"[yellow]warning[/yellow]: {quality['warning']}")
        elif low:
            quality["warning"] = f"the compressed model drifted far from the original: {', '.join(low)}"
            ctx.reporter.log(f"[yellow]warning[/yellow]: {quality['warning']}")
        return {"quality": quality}

    def _measure(self, graph: ModelGraph, base: Path, final: Path, ctx: Context) -> dict:
        variants = {"original": base} if base == final else {"original": base, "compressed": final}
        with ctx.reporter.step("measuring latency (interleaved rounds)"):
            bench = ctx.measure(variants, baseline="original")
        out = bench.to_dict()
        shapes = out.get("variants", {}).get("compressed", {}).get("shapes", [])
        slower = [s for s in shapes if s.get("speedup") is not None and s["speedup"] < 1.0]
        if shapes and len(slower) == len(shapes):
            ratios = ", ".join(speed_change(s["speedup"]) for s in slower)
            out["warning"] = (f"the compressed model is slower than the original on {ctx.target.name} "
                              f"({ratios}); on very small models the per-op overhead (e.g. quantize/dequantize) "
                              "can outweigh the savings: keep the original, or try another recipe")
        return out


def _merge_brings_its_own(p: Any) -> bool:
    """Merge passes whose config names the other models themselves (fusion's ``others``) need one input."""
    return bool(getattr(p.config, "others", None))


def _size(path: Path) -> int:
    from modelpress.export.files import onnx_file_size

    return onnx_file_size(path)


def _export_info(result: Any) -> dict:
    info = {}
    keys = ("optimization", "candidates", "file_size_bytes", "export_seconds", "kernels", "integer_kernels",
            "log_export", "float_fallback", "placement")
    for key in keys:
        if hasattr(result, key):
            info[key] = getattr(result, key)
    v = getattr(result, "verification", None)
    if isinstance(v, dict):
        info["verification"] = v
    elif v is not None:
        info["verification"] = {k: getattr(v, k) for k in ("max_abs_err", "cosine", "ok") if hasattr(v, k)}
    return info
