"""Lowering a fake-quant graph to QDQ ONNX: the exporter the ``quantize.repq`` pass hands the pipeline.

ONNX Runtime then runs integer kernels (MatMulIntegerToFloat and friends); TensorRT builds an
explicit-precision engine from the same form (standard QDQ, signed activations). The export is checked
against the torch fake-quant model on cosine, not exact equality: fake-quant models round at every
quantizer, so a float rounding tie can flip one integer code and the difference grows through the layers.
Log2 / log-sqrt2 probability quantizers have no QDQ form: they export as 8-bit uniform QDQ (the nearest
form with integer kernels) unless that strays from the torch simulation, then as an exact float-op
simulation; the choice and both checks go into the report.

Where the export still disagrees, the layers at fault are kept float rather than failing the run
(``quantize.fallback``): each quantized layer is exported alone and checked against its torch output;
those that disagree lose their quantizers (in the torch model too, so the two stay the same model), the
export is redone and verified, and ``float_fallback`` lists each layer with the reason. If no layer fails
alone, a bisection over the layers (a prefix kept float) finds where the whole graph starts to agree.
Only when even that does not verify does the export raise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelpress.errors import ModelpressError

# a QDQ export vs its torch fake-quant model: integer codes match until a rounding tie, then drift slightly
QDQ_MIN_COSINE = 0.99
# the conv placement quantizes every tensor between integer kernels (ONNX Runtime's placement: conv outputs
# feeding an Add, the Add outputs, pooling), which the torch simulation (each layer's input) does not: its
# check against the simulation leaves room for that extra rounding, still far from a broken export
PLACED_MIN_COSINE = 0.95
# outputs this small (e.g. random-init weights whose signal vanishes through the stages) are float rounding
# noise: their cosine says nothing, so they are compared on absolute error instead
VANISHING_OUTPUT = 1e-6


def agrees(check: dict) -> bool:
    """Whether a ``verify_qdq`` result counts as the same model (cosine; absolute error for vanishing outputs)."""
    if check["min_cosine"] >= QDQ_MIN_COSINE:
        return True
    ref = check.get("reference_max_abs")
    return ref is not None and ref < VANISHING_OUTPUT and check["max_abs_error"] < VANISHING_OUTPUT


@dataclass
class QuantizedExport:
    path: Path
    optimization: str
    verification: dict
    kernels: dict
    integer_kernels: int
    export_seconds: float
    log_export: dict | None = None  # how log2 probability quantizers were exported (None: there were none)
    # layers kept float because their QDQ export disagreed: [{"layer", "reason", "cosine"}]
    float_fallback: list[dict] | None = None
    # where the QDQ pairs went: ONNX Runtime's conv placement (placement.py) or the transformer form (qdq.py)
    placement: dict | None = None


def export_quantized(graph: Any, path: Path, ctx: Any, placement: str = "auto",
                     calibration_samples: int = 128, keep_faster: bool = True) -> QuantizedExport:
    """Write the fake-quant ``graph`` as QDQ ONNX at ``path``, verified against the torch model.

    ``placement``: "conv" puts the QDQ pairs where ONNX Runtime fuses convolutional networks (placement.py),
    "linear" uses the transformer form (every quantized layer's input and weight), "auto" the conv form
    where it applies (two or more quantized convolutions, no quantized attention) and verifies, else linear.
    ``keep_faster``: measure INT8 against float on ``ctx.target`` and keep float what loses (``speed.py``).
    """
    from modelpress.quantize.qdq import (
        export_examples,
        export_qdq,
        integer_kernel_count,
        log_quantizer_count,
        ort_kernels,
        verify_qdq,
    )
    from modelpress.quantize.quantizers import LOG_FORMS

    t0 = time.perf_counter()
    path = Path(path)
    example, batches = export_examples(graph)
    logs = log_quantizer_count(graph.module)
    # TensorRT wants standard QDQ with signed activations; ONNX Runtime's CPU kernels want U8S8 + its fusions
    tensorrt = getattr(ctx.target, "name", None) == "tensorrt"
    flavour = {"activation_dtype": "int8", "ort_fusion": False} if tensorrt else {}
    forms = ["uniform", "simulate"] if logs else ["uniform"]
    tried: dict[str, dict] = {}
    fallback: list[dict] | None = None

    def export(form: str) -> dict:
        export_qdq(graph.module, example, path, input_names=graph.input_spec.names,
                   dynamic_axes=graph.input_spec.dynamic_axes(), log_form=form, **flavour)
        return verify_qdq(path, graph.module, batches)

    placed = None
    if placement != "linear" and not tensorrt:
        placed = _export_conv_placement(graph, path, ctx, example, batches, placement, calibration_samples)
    with ctx.reporter.step("exporting the quantized model to QDQ ONNX"):
        for form in ([] if placed else forms):
            check = tried[form] = export(form)
            if agrees(check):
                break
        if placed:
            check = placed.pop("check")
        elif not agrees(check):
            first = check["min_cosine"]
            check, fallback = _float_fallback(graph, example, batches, form, flavour, export)
            fallback = [{**f, "model_cosine_before": first} for f in fallback]
            tried[form] = check
        kernels = ort_kernels(path, workdir=path.parent)
    # the conv placement passed its own check (PLACED_MIN_COSINE) in _export_conv_placement
    if not placed and check["min_cosine"] < QDQ_MIN_COSINE and agrees(check):
        check["vanishing_output"] = True
        ctx.reporter.log(f"[yellow]warning[/yellow]: the model's outputs vanish (max |output| "
                         f"{check['reference_max_abs']:.1e}): the INT8 export was checked on absolute error, not "
                         "cosine; random-init weights? the quality numbers of such a model mean little")
    if not placed and not agrees(check):
        raise ModelpressError(
            f"the INT8 ONNX export disagrees with the quantized torch model (cosine {check['min_cosine']:.4f}), "
            "even with the layers at fault kept float",
            "report this with the recipe; try fewer low-bit layers",
        )
    for f in fallback or []:
        ctx.reporter.log(f"[yellow]warning[/yellow]: {f['layer']} kept float in the INT8 export: {f['reason']}")
    if tensorrt:
        from modelpress.export.tensorrt import tensorrt_problems

        problems = tensorrt_problems(path)
        if problems:
            raise ModelpressError(f"the quantized export is not TensorRT-ready: {problems[0]}",
                                  "leave quantize.repq's symmetric_activations at auto (or true) for --target tensorrt")
    guard = None
    if keep_faster and not tensorrt and getattr(ctx, "target", None) is not None:
        def redo() -> None:
            nonlocal check
            again = placed and _export_conv_placement(graph, path, ctx, example, batches, placement,
                                                      calibration_samples)
            check = again.pop("check") if again else export(form if logs else "uniform")

        guard = _speed_guard(graph, path, ctx, redo)
        if guard["decision"] == "float":
            check = verify_qdq(path, graph.module, batches)
        kernels = ort_kernels(path, workdir=path.parent)
    log_export = None
    if logs:
        log_export = {"quantizers": logs, "form": form, "description": LOG_FORMS[form], "checks": tried}
        ctx.reporter.log(f"log2 attention probabilities have no ONNX QDQ form: exported as {form!r} "
                         f"(cosine to the torch simulation {check['min_cosine']:.4f})")
    where = {**(placed or {"placement": "linear"}), **({"speed_guard": guard} if guard else {})}
    return QuantizedExport(path, "qdq", check, dict(kernels), integer_kernel_count(kernels),
                           time.perf_counter() - t0, log_export, fallback, where)


def _speed_guard(graph: Any, path: Path, ctx: Any, reexport: Any) -> dict:
    """``speed.keep_faster`` on the real target: INT8 against this model in float, interleaved; the
    profiler's node times when INT8 loses; this graph's quantizers turned off where it gives up."""

    from modelpress.export.files import remove_onnx
    from modelpress.quantize.fakequant import quant_layers, set_quant_state
    from modelpress.quantize.fallback import keep_float
    from modelpress.quantize.placement import export_float
    from modelpress.quantize.speed import block_of, keep_faster, layer_units
    from modelpress.targets import get_target

    float_path = path.with_name(path.stem + ".float-twin.onnx")
    names = graph.input_spec.names
    text = graph.input_spec.kind == "text"

    def export_plain(to: Path) -> None:
        set_quant_state(graph.module, weights=False, activations=False)
        try:
            export_float(graph.module, graph.example_inputs(2, 16 if text else None), to, names,
                         graph.input_spec.dynamic_axes(), stream=True)
        finally:
            set_quant_state(graph.module, weights=True, activations=True)

    quantized = [n for n, m in quant_layers(graph.module) if _has_quantizer(m)]
    blocks = layer_units(quantized)
    feeds = {k: v.numpy() for k, v in graph.example_inputs(1, 128 if text else None).items()}
    target = get_target(ctx.target)

    def give_up() -> None:  # every quantizer removed, as the float fallback does: a reload stays float
        keep_float(graph.module, quantized)
        export_plain(path)

    def measure() -> dict:
        # the exports read the weights: mapped ones (spilled by the pipeline) leave the resident set before the
        # sessions load (BERT-base: the timing peaked at 3.77x its weights with them resident)
        graph.drop_mapped_weights()
        # speed only: the memory probes' children would hold both models' sessions beside this process
        return ctx.measure({"float": float_path, "int8": path}, baseline="float", memory=False).to_dict()

    try:
        export_plain(float_path)
        with ctx.reporter.step("checking that INT8 pays on the target"):
            return keep_faster(
                measure=measure,
                profile=lambda: (target.node_times(path, feeds), target.node_times(float_path, feeds)),
                layers_in=lambda bs: [n for n in quantized if block_of(n, blocks) in set(bs)],
                keep_float=lambda layers: keep_float(graph.module, layers),
                reexport=reexport, give_up=give_up, blocks=blocks, log=ctx.reporter.log,
            )
    finally:
        remove_onnx(float_path)  # with its external data, when streamed



def _export_conv_placement(graph: Any, path: Path, ctx: Any, example: Any, batches: list, placement: str,
                           samples: int) -> dict | None:
    """The conv placement's export and check, or None (the reason logged) where it does not apply."""
    from modelpress.quantize.fakequant import weight_quantizers
    from modelpress.quantize.placement import export_placed, onnx_feeds, placement_applies
    from modelpress.quantize.qdq import verify_qdq

    fits, why = placement_applies(graph.module)
    if not fits:
        if placement == "conv":
            ctx.reporter.log(f"conv QDQ placement does not apply ({why}): exporting in the transformer form")
        return None
    split = getattr(ctx, "calibration", None)
    feeds = onnx_feeds(split.batches if split is not None else [], graph.input_spec.names, samples)
    if not feeds:
        ctx.reporter.log("conv QDQ placement needs calibration data: exporting in the transformer form")
        return None
    reduce = any(q.qmax < 127 for _, _, q in weight_quantizers(graph.module))
    # checked on calibration samples (the ranges are theirs; random inputs overflow them), not random ones
    real = [{k: torch.from_numpy(v) for k, v in f.items()} for f in feeds[:2]]
    if graph.input_spec.kind != "text":
        real = [f[graph.input_spec.names[0]] for f in real]
    with ctx.reporter.step("exporting the quantized model to QDQ ONNX (ONNX Runtime's conv placement)"):
        info = export_placed(graph.module, example, path, feeds, input_names=graph.input_spec.names,
                             dynamic_axes=graph.input_spec.dynamic_axes(), weight_reduce_range=reduce)
        check = verify_qdq(path, graph.module, real or batches)
    if check["min_cosine"] >= PLACED_MIN_COSINE or agrees(check):
        # verified at the placement's own threshold (verify_qdq's "ok" is its stricter default)
        return {**info, "check": {**check, "ok": True, "min_cosine_required": PLACED_MIN_COSINE}}
    ctx.reporter.log(f"[yellow]warning[/yellow]: the conv QDQ placement strays from the torch model (cosine "
                     f"{check['min_cosine']:.4f}): exporting in the transformer form instead")
    return None


def _float_fallback(
    graph: Any, example: Any, batches: list, form: str, flavour: dict, export: Any
) -> tuple[dict, list[dict]]:
    """Keep float the layers whose QDQ export disagrees, re-export, verify: (check, [{layer, reason}]).

    First each layer alone against its own torch output; if none fails alone (a fault of the whole
    graph), the shortest prefix of layers that makes the export agree."""
    from functools import partial

    from modelpress.quantize.fallback import bisect_layers, diverging_layers, keep_float
    from modelpress.quantize.qdq import export_qdq, verify_qdq

    layer_export = partial(export_qdq, log_form=form, **flavour)
    found = diverging_layers(graph.module, example, layer_export, verify_qdq)
    check = None
    if found:
        keep_float(graph.module, [f["layer"] for f in found])
        check = export(form)
        if agrees(check):
            return check, found
    last: dict = {}

    def exported_agrees() -> bool:
        last["check"] = export(form)
        return agrees(last["check"])

    prefix = bisect_layers(graph.module, exported_agrees)
    if prefix is None:
        return (check or last["check"]), found
    check = export(form)  # the file on disk must be the agreeing one
    reason = "the whole-graph QDQ export disagreed until this layer was kept float (found by bisection)"
    found += [{"layer": n, "reason": reason, "cosine": None} for n in prefix if n not in {f["layer"] for f in found}]
    return check, found


def _has_quantizer(m: Any) -> bool:
    return any(getattr(m, a, None) is not None for a in ("weight_quantizer", "input_quantizer", "a_quantizer",
                                                          "b_quantizer"))
