"""FP32 MiniLM: modelpress's ONNX export vs torch eager, a plain torch.onnx export and optimum's export.

All four are timed in one interleaved run (ONNX Runtime CPU, target ort-cpu) at batch 1 and 8,
sequence 128, with speedups as medians of per-round ratios against the plain torch.onnx export.
Writes benchmarks/results/export_latency.json and prints a table.

    python benchmarks/export_latency.py            # the full run (5 rounds)
    python benchmarks/export_latency.py --quick    # a smoke run (1 round, few runs)

The acceptance criterion: ours at least as fast as the fastest of the others at every batch size
(within a stated noise tolerance; the strict comparison is recorded too).
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    console,
    load_minilm,
    minilm_path,
    optimum_export,
    parse_timing_args,
    timing_kwargs,
    timing_parser,
    timing_target,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OURS = "modelpress"
BASELINE = "plain_onnx"
NOISE_TOLERANCE = 0.03


def plain_export(model, spec, path: Path, opset: int = 17) -> float:  # noqa: ANN001
    """What a user would write: torch.onnx.export of the model as loaded (its default attention)."""
    import torch

    from modelpress.graph.inputs import PrimaryOutput

    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sample = spec.make_torch(2, 16)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            PrimaryOutput(model, spec.names),
            tuple(sample[n] for n in spec.names),
            str(path),
            input_names=list(spec.names),
            output_names=["output"],
            dynamic_axes={**spec.dynamic_axes(), "output": {0: "batch", 1: "sequence"}},
            opset_version=opset,
            dynamo=False,
        )
    return time.perf_counter() - started


def acceptance(report, batches: list[int], seq: int) -> dict[str, Any]:  # noqa: ANN001
    """Ours vs the fastest other variant per batch size, as the median of per-round latency ratios."""
    per_batch: dict[str, Any] = {}
    passed = strict = True
    for batch in batches:
        ours = report.stats(OURS, batch, seq)
        ratios: dict[str, float] = {}
        for name in report.variants:
            if name == OURS:
                continue
            peer = report.stats(name, batch, seq)
            rounds = [o / p for o, p in zip(ours.speedup_rounds, peer.speedup_rounds, strict=True) if p > 0]
            if rounds:
                ratios[name] = statistics.median(rounds)  # > 1: ours is faster than this peer
        fastest = min(ratios, key=ratios.get) if ratios else None
        ratio = ratios[fastest] if fastest else None
        ok = ratio is not None and ratio >= 1.0 - NOISE_TOLERANCE
        passed, strict = passed and ok, strict and ratio is not None and ratio >= 1.0
        cpu = {
            name: report.stats(name, batch, seq).cpu_ms / ours.cpu_ms
            for name in report.variants
            if name != OURS and ours.cpu_ms and report.stats(name, batch, seq).cpu_ms
        }
        per_batch[str(batch)] = {
            "fastest_other": fastest,
            "ours_speedup_vs_fastest_other": ratio,
            "ours_speedup_vs_each": ratios,
            "ok": ok,
            # Secondary, steadier on a busy machine: ratio of median process CPU time per run (> 1: ours
            # uses less). It counts spin-waiting when threads > 1; cleanest with --threads 1.
            "ours_cpu_time_advantage_vs_each": cpu,
        }
    return {
        "criterion": (
            f"ours at least as fast as the fastest other variant at every batch size, "
            f"within a {NOISE_TOLERANCE:.0%} noise tolerance (median of per-round latency ratios)"
        ),
        "noise_tolerance": NOISE_TOLERANCE,
        "per_batch": per_batch,
        "ours_at_least_as_fast": passed,
        "ours_at_least_as_fast_strict": strict,
    }


def main(argv: list[str] | None = None) -> int:
    parser = timing_parser(__doc__, RESULTS / "export_latency.json")
    parser.add_argument("--no-optimum", action="store_true", help="skip optimum (no side venv)")
    args = parse_timing_args(parser, argv)

    from modelpress.bench import candidate_timer, measure, write_json_atomic
    from modelpress.export import export_onnx, verify_onnx
    from modelpress.progress import Reporter

    con = console()
    reporter = Reporter()
    started = time.perf_counter()
    target = timing_target(args)
    model, spec = load_minilm()
    batches, seq = [1, 8], 128
    exports: dict[str, Any] = {}
    variants: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="modelpress-export-latency-") as tmp:
        tmpdir = Path(tmp)

        plain = tmpdir / "plain" / "model.onnx"
        with reporter.step("plain torch.onnx export"):
            seconds = plain_export(model, spec, plain)
        v = verify_onnx(plain, model, spec)
        exports[BASELINE] = {
            "how": "torch.onnx.export(dynamo=False), opset 17, the model's default attention "
            f"({model.config._attn_implementation}), no graph optimization",
            "seconds": round(seconds, 2),
            "verification": vars(v),
        }
        variants[BASELINE] = plain

        ours = export_onnx(
            model, spec, tmpdir / "ours" / "model.onnx", optimize="auto", timer=candidate_timer(target), reporter=reporter
        )
        exports[OURS] = {
            "how": "modelpress.export.export_onnx(optimize='auto')",
            **ours.to_dict(),
            "path": ours.path.name,
        }
        variants[OURS] = ours.path

        if args.no_optimum:
            exports["optimum"] = {"status": "skipped", "reason": "--no-optimum"}
        else:
            try:
                with reporter.step("optimum export (side venv)"):
                    info = optimum_export(minilm_path(), tmpdir / "optimum", log=reporter.log)
                v = verify_onnx(info["path"], model, spec)
                exports["optimum"] = {
                    "status": "ok",
                    **info,
                    "path": info["path"].name,
                    "verification": vars(v),
                }
                variants["optimum"] = info["path"]
            except Exception as exc:  # record why, keep measuring the rest
                exports["optimum"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
                reporter.log(f"[yellow]optimum unavailable:[/yellow] {exc}")

        variants["torch_eager"] = model
        exports["torch_eager"] = {
            "how": f"the transformers model in torch ({model.config._attn_implementation})"
        }

        report = measure(
            variants,
            spec,
            target,
            **timing_kwargs(args),
            max_time_s=30.0,
            baseline=BASELINE,
            batch_sizes=batches,
            seq_lens=[seq],
            reporter=reporter,
        )
        for name in exports:
            if name in report.variants and report.variants[name].path:
                report.variants[name].path = Path(report.variants[name].path).name

    result = {
        "benchmark": "export_latency",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, FP32), output last_hidden_state",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "system": report.system,
        "target": report.target,
        "shapes": {"batch_sizes": batches, "seq_len": seq},
        "baseline": BASELINE,
        "exports": exports,
        "measurement": report.to_dict(),
        "acceptance": acceptance(report, batches, seq),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = write_json_atomic(args.out, result)
    con.print(
        report.to_table(title=f"MiniLM FP32 on {target.name}, {target.threads} threads, sequence {seq}")
    )
    acc = result["acceptance"]
    for batch, row in acc["per_batch"].items():
        ratio = row["ours_speedup_vs_fastest_other"]
        con.print(
            f"batch {batch}: ours vs fastest other ({row['fastest_other']}): "
            f"{'-' if ratio is None else f'{ratio:.3f}x'} {'ok' if row['ok'] else 'NOT ok'}"
        )
    con.print(f"ours at least as fast as the fastest other: {acc['ours_at_least_as_fast']}  (wrote {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
