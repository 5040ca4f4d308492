"""Readable renderings of a run's report (rich tables for the terminal, Markdown for report.md)."""

from __future__ import annotations

from typing import Any

QUALITY_KEYS = ("fidelity_mean", "fidelity_min", "spearman", "accuracy", "agreement",
                "next_token_kl", "top1_agreement", "perplexity")
# how the language-model task's metrics read in the tables (the others: the key with spaces)
QUALITY_LABELS = {"next_token_kl": "next-token KL (vs original)", "top1_agreement": "top-1 agreement",
                  "perplexity": "perplexity (held-out text)"}
# KL of a good int8 model is far below 1e-4: shown with significant digits, not four decimals
QUALITY_FORMATS = {"next_token_kl": ".3e", "perplexity": ".4g"}


def comparison_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, change) rows shared by the terminal table and report.md. A class-wise split
    compares each sub-model with the full model (its model.onnx is the full model, unchanged)."""
    split = classwise_summary(report)
    if split is not None:
        return classwise_rows(split)
    rows: list[tuple[str, str, str, str]] = []
    b, a = report.get("before", {}), report.get("after", {})
    if "parameters" in b:
        rows.append(("parameters", f"{b['parameters'] / 1e6:.2f} M", f"{a['parameters'] / 1e6:.2f} M",
                     size_change(b["parameters"], a["parameters"])))
    if "file_bytes" in b:
        rows.append(("ONNX file", f"{b['file_bytes'] / 2**20:.1f} MiB", f"{a['file_bytes'] / 2**20:.1f} MiB",
                     size_change(b["file_bytes"], a["file_bytes"])))
    lat = report.get("latency")
    if lat:
        variants = lat.get("variants", {})
        base = variants.get("original", {})
        comp = variants.get("compressed", base)
        for sb in base.get("shapes", []):
            sa = next((s for s in comp.get("shapes", []) if s["batch"] == sb["batch"] and s["seq_len"] == sb["seq_len"]), sb)
            shape = f"batch {sb['batch']}" + (f", seq {sb['seq_len']}" if sb.get("seq_len") else "")
            speed = sa.get("speedup") if comp is not base else 1.0
            rows.append((f"ORT latency median ({shape})", f"{sb['median_ms']:.2f} ms", f"{sa['median_ms']:.2f} ms",
                         speed_change(speed)))
    rows += generation_rows(report)
    quality = report.get("quality")
    if quality:
        qb, qa = quality.get("before", {}), quality.get("after", {})
        for key in QUALITY_KEYS:
            if key in qa:
                before = qb.get(key)
                fmt = QUALITY_FORMATS.get(key, ".4f")
                rows.append((QUALITY_LABELS.get(key, key.replace("_", " ")),
                             "-" if before is None else format(before, fmt), format(qa[key], fmt),
                             "-" if before is None else format(qa[key] - before, "+" + fmt)))
    return rows


def generation_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Causal LMs: prefill latency, decode latency per token, tokens/s (per batch size) and peak memory of
    greedy generation through the key-value cache, original vs compressed decoder, measured interleaved."""
    gen = report.get("generation") or {}
    variants = gen.get("variants") or {}
    base = variants.get("original")
    if not base:
        return []
    comp = variants.get("compressed", base)
    same = comp is base
    rows: list[tuple[str, str, str, str]] = []
    for sb in base.get("stats", []):
        sa = next((s for s in comp.get("stats", []) if s["batch"] == sb["batch"]), sb)
        b = sb["batch"]
        rows.append((f"prefill latency (batch {b}, prompt {sb['prompt_len']})", f"{sb['prefill_ms']:.2f} ms",
                     f"{sa['prefill_ms']:.2f} ms", speed_change(1.0 if same else sa.get("prefill_speedup"))))
        rows.append((f"decode latency per token (batch {b})", f"{sb['decode_ms']:.2f} ms", f"{sa['decode_ms']:.2f} ms",
                     speed_change(1.0 if same else sa.get("decode_speedup"))))
        rows.append((f"decode tokens/s (batch {b})", f"{sb['tokens_per_s']:.1f}", f"{sa['tokens_per_s']:.1f}",
                     speed_change(1.0 if same else sa.get("decode_speedup"))))
        if sb.get("peak_memory_mb") is not None and sa.get("peak_memory_mb") is not None:
            rows.append((f"generation peak memory (batch {b})", f"{sb['peak_memory_mb']:.0f} MiB",
                         f"{sa['peak_memory_mb']:.0f} MiB", size_change(sb["peak_memory_mb"], sa["peak_memory_mb"])))
    if base.get("file_size_bytes") and comp.get("file_size_bytes"):
        rows.append(("decoder file (with cache)", f"{base['file_size_bytes'] / 2**20:.1f} MiB",
                     f"{comp['file_size_bytes'] / 2**20:.1f} MiB", size_change(base["file_size_bytes"], comp["file_size_bytes"])))
    return rows


def _decode_speedups(report: dict[str, Any]) -> dict[int, float]:
    """Causal LMs: the compressed decoder's per-token decode speedup over the original's, per batch size."""
    comp = ((report.get("generation") or {}).get("variants") or {}).get("compressed") or {}
    return {int(s["batch"]): float(s["decode_speedup"]) for s in comp.get("stats", []) if s.get("decode_speedup")}


def classwise_summary(report: dict[str, Any]) -> dict[str, Any] | None:
    """The class-wise split a run produced (``prune.classwise``'s summary), or None."""
    if report.get("classwise"):
        return report["classwise"]
    return next((p["classwise"] for p in report.get("passes") or [] if p.get("classwise")), None)


def classwise_rows(split: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Each sub-model against the full model (parameters; batch-1 latency on the sub-model's device, both
    measured in one run), then the combined accuracy of both rules against the full model's."""
    full = split["full"]
    rows: list[tuple[str, str, str, str]] = []
    for s in split["sub_models"]:
        label = f"{s['name']} (classes {_classes(s['classes'])})"
        rows.append((f"{label} parameters", f"{full['params'] / 1e6:.3f} M", f"{s['params'] / 1e6:.3f} M",
                     size_change(full["params"], s["params"])))
        theirs = s.get("full_latency_ms")
        rows.append((f"{label} latency on {s['device']} (batch 1)", "-" if theirs is None else f"{theirs:.3f} ms",
                     f"{s['latency_ms']:.3f} ms", speed_change(s.get("speedup")) if theirs else "given, not measured"))
    combined = split["combined"]
    metric, before = combined["metric"], combined["full_model"]
    for rule in ("fusion", "concat"):
        rows.append((f"combined {metric} ({rule})", f"{before:.4f}", f"{combined[rule]:.4f}",
                     f"{combined[rule] - before:+.4f}"))
    return rows


def classwise_placement_lines(split: dict[str, Any]) -> list[str]:
    """report.md's placement section: which device runs which sub-model, each device's load."""
    lines = ["", "## Class-wise split", "",
             f"The sub-models, combiners and assignment are in `{split.get('output', 'classwise/')}`; `model.onnx` "
             "is the full model, unchanged.", "",
             "| sub-model | classes | device | parameters | latency (ms) | full model (ms) |",
             "|---|---|---|---:|---:|---:|"]
    for s in split["sub_models"]:
        full = s.get("full_latency_ms")
        lines.append(f"| {s['name']} | {_classes(s['classes'])} | {s['device']} | {s['params']:,} | "
                     f"{s['latency_ms']:.3f} | {'-' if full is None else f'{full:.3f}'} |")
    placement = split["placement"]
    loads = ", ".join(f"{d} {ms:.3f} ms" for d, ms in placement["loads_ms"].items())
    lines += ["", f"Device loads: {loads}; slowest device {placement['makespan_ms']:.3f} ms."]
    return lines


def _classes(classes: list[int]) -> str:
    """A class list, runs shortened: [0, 1, 2, 3, 7] -> "0-3, 7"."""
    parts, run = [], [classes[0]] if classes else []
    for c in classes[1:]:
        if c == run[-1] + 1:
            run.append(c)
            continue
        parts.append(run)
        run = [c]
    parts += [run] if run else []
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in parts)


def speed_change(speedup: float | None) -> str:
    """A speed ratio (original time / compressed time) in words: "1.25x faster", "1.32x slower", never
    "0.76x faster"."""
    if not speedup or speedup <= 0:
        return "-"
    if f"{speedup:.2f}" == "1.00":
        return "same speed"
    return f"{speedup:.2f}x faster" if speedup > 1 else f"{1 / speedup:.2f}x slower"


def size_change(before: float, after: float) -> str:
    """A size change in words: "2.00x smaller", "1.20x larger" or "same size"."""
    if before <= 0 or after <= 0:
        return "-"
    ratio = before / after
    if f"{ratio:.2f}" == "1.00":
        return "same size"
    return f"{ratio:.2f}x smaller" if ratio > 1 else f"{after / before:.2f}x larger"


def review(report: dict[str, Any]) -> dict[str, list[str]]:
    """Warnings when the compressed model is slower or larger than the original on the measured target,
    and what to try instead (another recipe, another target or batch size); empty lists when it pays."""
    split = classwise_summary(report)
    if split is not None:  # model.onnx is the full model: the sub-models are what to judge
        return classwise_review(split)
    warnings: list[str] = []
    suggestions: list[str] = []
    passes = [p.get("pass", "") for p in (report.get("recipe") or {}).get("passes", [])]
    quantized = any(p.startswith("quantize.") for p in passes)
    weight_only = "quantize.weight_only" in passes
    lat = report.get("latency") or {}
    target = (lat.get("target") or {}).get("name", "the target")
    shapes = ((lat.get("variants") or {}).get("compressed") or {}).get("shapes", [])
    measured = [s for s in shapes if s.get("speedup")]
    slower = [s for s in measured if s["speedup"] < 1.0 and speed_change(s["speedup"]) != "same speed"]
    faster = [s for s in measured if s["speedup"] > 1.0 and speed_change(s["speedup"]) != "same speed"]
    if slower:
        where = ", ".join(f"batch {s['batch']}: {speed_change(s['speedup'])}" for s in slower)
        scope = "at every measured shape" if len(slower) == len(measured) else "at some shapes"
        warnings.append(f"the compressed model is slower than the original on {target} {scope} ({where})")
        decode = _decode_speedups(report)
        if weight_only:
            # packed weights are unpacked block by block in every MatMulNBits call: that pays when a call reads
            # a few rows (token-by-token decoding, memory-bound), not in full-sequence forwards of many rows
            if decode and all(v > 1.0 for v in decode.values()):
                suggestions.append("weight-only quantization pays in token-by-token generation, the way LMs are "
                                   "served: decode is " + ", ".join(f"{speed_change(v)} at batch {b}"
                                                                    for b, v in sorted(decode.items()))
                                   + " (the generation rows); full-sequence forwards unpack every weight block")
            else:
                suggestions.append("weight-only quantization saves memory and pays when few rows are multiplied "
                                   "(decoding one token at a time); for full-sequence speed try --recipe int8")
        elif quantized:
            suggestions.append("on small models the quantize/dequantize overhead can outweigh the INT8 savings: "
                               "try --recipe fp32 (graph optimization only) or --recipe prune-magnitude "
                               "(smaller float matrices)")
        else:
            suggestions.append("try another recipe (e.g. --recipe int8, or larger pruning ratios), or keep the original")
        if faster:
            best = max(faster, key=lambda s: s["speedup"])
            larger = all(best["batch"] > s["batch"] for s in slower)
            suggestions.append(f"it pays at batch {best['batch']} ({speed_change(best['speedup'])}): "
                               + ("serve with larger batches" if larger else f"serve at batch {best['batch']}"))
        elif target != "edge":
            suggestions.append("measure on another target: --target edge (one thread, batch 1), "
                               "or with a bigger batch where each operator does more work")
        else:
            suggestions.append("measure with a bigger batch or on --target ort-cpu (all cores, batch 1 and 8)")
    guard = (((report.get("export") or {}).get("compressed") or {}).get("placement") or {}).get("speed_guard") or {}
    if guard.get("decision") == "float":
        warnings.append(f"INT8 did not pay on {target}: {guard['reason']}; the float model was handed back")
        suggestions.append("INT8 pays on bigger models and batches: measure with --target at the batch size you "
                           "serve, or try --recipe prune-magnitude")
    elif guard.get("blocks_kept_float"):
        warnings.append(f"INT8 lost on {target} in {len(guard['blocks_kept_float'])} block(s), kept float: "
                        + ", ".join(b or "(outside blocks)" for b in guard["blocks_kept_float"]))
    b, a = report.get("before", {}), report.get("after", {})
    if b.get("file_bytes") and a.get("file_bytes") and size_change(b["file_bytes"], a["file_bytes"]).endswith("larger"):
        warnings.append(f"the compressed ONNX file is {size_change(b['file_bytes'], a['file_bytes'])} than the original")
        if quantized:
            suggestions.append("scales, zero points and quantize/dequantize nodes cost more than INT8 weights "
                               "save on a model this small" + ("" if slower else
                                                               ": try --recipe fp32 or --recipe prune-magnitude"))
        else:
            suggestions.append("try --recipe int8 (INT8 weights) or larger pruning ratios")
    drift = (report.get("quality") or {}).get("warning")
    if drift and "rounding noise" in drift:
        warnings.append(drift)
        suggestions.append("judge compression on a model with trained weights (e.g. torchvision:NAME@DEFAULT)")
    elif drift:
        warnings.append(drift)
        suggestions.append("keep more of the model: smaller pruning ratios, or a recipe that keeps sensitive layers "
                           "in float (quantize.repq auto_float)" if quantized else
                           "keep more of the model: smaller pruning ratios, or recover with distillation")
    return {"warnings": warnings, "suggestions": list(dict.fromkeys(suggestions))}


def classwise_review(split: dict[str, Any]) -> dict[str, list[str]]:
    """A warning when sub-models measured slower than the full model on their devices, and what to try."""
    slower = [s for s in split["sub_models"]
              if s.get("speedup") and s["speedup"] < 1.0 and speed_change(s["speedup"]) != "same speed"]
    if not slower:
        return {"warnings": [], "suggestions": []}
    where = ", ".join(f"{s['name']} on {s['device']}: {speed_change(s['speedup'])}" for s in slower)
    return {"warnings": [f"sub-models measured slower than the full model at batch 1 ({where})"],
            "suggestions": ["on a model this small the per-run overhead outweighs the savings: prune the "
                            "sub-models harder (a smaller ratio), or split a larger model"]}


def render_table(report: dict[str, Any]):  # noqa: ANN201 - rich.table.Table
    from rich.table import Table

    title = f"{report.get('model', 'model')} with recipe {report.get('recipe', {}).get('name', '?')}"
    table = Table(title=title)
    for col in ("metric", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in comparison_rows(report):
        table.add_row(*row)
    if classwise_summary(report) is not None:
        table.caption = ("each sub-model vs the full model; the combined accuracy on held-out data; "
                         "the split is in classwise/, model.onnx is the full model")
    elif report.get("quality"):
        table.caption = "quality of the exported ONNX models vs the original torch model, on held-out data"
    return table


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {report.get('model', 'model')}: recipe `{report.get('recipe', {}).get('name', '?')}`",
        "",
        "| metric | before | after | change |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {m} | {b} | {a} | {c} |" for m, b, a, c in comparison_rows(report)]
    split = classwise_summary(report)
    if split is not None:
        lines += classwise_placement_lines(split)
    warnings = report.get("warnings")
    if warnings is None:  # a report written before the review existed
        warnings = [w for w in [(report.get("latency") or {}).get("warning")] if w]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- **Warning**: {w}" for w in warnings]
        lines += [f"- Try: {s}" for s in report.get("suggestions", [])]
    lines += ["", "## Passes", ""]
    for p in report.get("passes", []) or [{"pass": "(none: export only)"}]:
        extra = {k: _short(v) for k, v in p.items() if k not in ("pass", "stage")}
        lines.append(f"- `{p['pass']}`: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    lines += export_lines(report)
    system = (report.get("latency") or {}).get("system", {})
    if system:
        lines += ["", "## Machine", "", f"- CPU: {system.get('cpu_model')}, flags: {', '.join(system.get('cpu_flags', []))}",
                  f"- threads: {system.get('threads')}; versions: {system.get('versions')}"]
    lines += ["", f"Data: {report.get('data', '-')}; task: {report.get('task', '-')}.", ""]
    return "\n".join(lines)


def _short(value: Any) -> str:
    """A pass metric for report.md: numbers and short lists as they are, anything bigger by its size."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return f"({len(value)} entries, see report.json)" if len(value) > 4 else str(value)
    if isinstance(value, list) and len(value) > 6:
        return f"({len(value)} items, see report.json)"
    return str(value)


def export_lines(report: dict[str, Any]) -> list[str]:
    """The compressed export's form, integer kernels, and what an approximate export form costs."""
    comp = (report.get("export") or {}).get("compressed") or {}
    if not comp:
        return []
    lines = ["", "## Export", "", f"- form: {comp.get('optimization', '-')}"
             + (f", {comp['integer_kernels']} integer kernels in ONNX Runtime" if "integer_kernels" in comp else "")]
    log = comp.get("log_export")
    if log:
        lines.append(f"- log2 attention probabilities ({log['quantizers']} quantizers) have no ONNX QDQ form: "
                     f"exported as `{log['form']}`: {log['description']}")
        quality = report.get("quality") or {}
        sim, after = quality.get("torch_simulation"), quality.get("after")
        if sim and after:
            cost = ", ".join(f"{k.replace('_', ' ')} {sim[k]:.4f} -> {after[k]:.4f}"
                             for k in QUALITY_KEYS if k in sim and k in after)
            lines.append(f"- cost of that form (torch simulation -> exported ONNX): {cost}")
    for fb in comp.get("float_fallback") or []:
        lines.append(f"- kept in float: `{fb.get('layer')}` ({fb.get('reason', 'its INT8 export disagreed')})")
    return lines


def render_inspect(summary: dict[str, Any]):  # noqa: ANN201 - rich.console renderable
    from rich.console import Group as RichGroup
    from rich.table import Table

    table = Table(title=f"{summary['name']}: blocks")
    cols = ["block", "type", "heads", "head dim", "MLP width", "params"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("block", "type") else "right")
    for b in summary["blocks"]:
        table.add_row(b["block"], b["type"], str(b.get("heads", "-")), str(b.get("head_dim", "-")),
                      str(b.get("mlp", b.get("conv_channels", "-"))), f"{b['params']:,}")
    shape = summary["input_shape"]
    totals = Table.grid(padding=(0, 2))
    totals.add_row("embedding width", str(summary.get("embedding_width") or "-"))
    totals.add_row("blocks", str(len(summary["blocks"])))
    totals.add_row("parameters", f"{summary['parameters']:,}")
    totals.add_row("MACs", f"{summary['macs'] / 1e9:.3f} G at {shape}")
    fixed = [g["name"] for g in summary["groups"] if not g["prunable"]]
    totals.add_row("groups", f"{len(summary['groups'])} ({len(fixed)} fixed)")
    return RichGroup(table, totals)
