"""Timing export candidates: the CandidateTimer that lets ``export_onnx(optimize="auto")`` keep the fastest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelpress.bench.runner import measure
from modelpress.export.onnx import CandidateTimer
from modelpress.graph.inputs import InputSpec
from modelpress.targets import Target, get_target


def candidate_timer(target: Target | str | None = None, rounds: int = 3) -> CandidateTimer:
    """A timer for export candidates on ``target`` (default ort-cpu): interleaved rounds at batch 1 and
    the input's default sequence length, median of per-round speedups over the baseline."""
    resolved = get_target(target or "ort-cpu")

    def timer(
        candidates: dict[str, Path], input_spec: InputSpec, baseline: str
    ) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
        seq = input_spec.default_seq_len if input_spec.kind == "text" else None
        report = measure(
            candidates, input_spec, resolved, rounds=rounds, runs=12, min_time_s=0.2, warmup=3,
            baseline=baseline, batch_sizes=[1], seq_lens=[seq] if seq else None, memory=False,
        )
        stats = {}
        for name in candidates:
            s = report.stats(name, 1)
            stats[name] = (s.median_ms, s.speedup)
        timing = {"target": resolved.name, "threads": resolved.threads, "batch": 1, "seq_len": seq,
                  "rounds": rounds, "seconds": round(report.seconds, 2)}
        return stats, timing

    return timer
