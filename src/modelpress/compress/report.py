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
    """(metric, before, after, change) rows shared by the terminal table and report.md."""
    rows: list[tuple[str, str, str, str]] = []
    b, a = report.get("before", {}), report.get("after", {})
    if "parameters" in b:
        rows.append(("parameters", f"{b['parameters'] / 1e6:.2f} M", f"{a['parameters'] / 1e6:.2f} M",
                     f"{a['parameters'] / max(1, b['parameters']):.2f}x"))
    if "file_bytes" in b:
        rows.append(("ONNX file", f"{b['file_bytes'] / 2**20:.1f} MiB", f"{a['file_bytes'] / 2**20:.1f} MiB",
                     f"{a['file_bytes'] / max(1, b['file_bytes']):.2f}x"))
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
                         f"{speed:.2f}x faster" if speed else "-"))
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


def render_table(report: dict[str, Any]):  # noqa: ANN201 - rich.table.Table
    from rich.table import Table

    title = f"{report.get('model', 'model')} with recipe {report.get('recipe', {}).get('name', '?')}"
    table = Table(title=title)
    for col in ("metric", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in comparison_rows(report):
        table.add_row(*row)
    if report.get("quality"):
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
    warning = (report.get("latency") or {}).get("warning")
    if warning:
        lines += ["", f"**Warning**: {warning}"]
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
