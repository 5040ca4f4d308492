"""Targets, the interleaved latency runner and its reports."""

from __future__ import annotations

from modelpress.bench.candidates import candidate_timer
from modelpress.bench.latency import LatencyTable, build_latency_table, compare_latency
from modelpress.bench.onnx_inputs import input_spec_from_onnx
from modelpress.bench.remote import AgentClient, agent_token
from modelpress.bench.runner import (
    BenchReport,
    ShapeStats,
    VariantResult,
    measure,
    system_info,
    write_json_atomic,
)
from modelpress.targets import TARGETS, Target, get_target, list_targets

__all__ = [
    "TARGETS",
    "AgentClient",
    "BenchReport",
    "LatencyTable",
    "ShapeStats",
    "Target",
    "VariantResult",
    "agent_token",
    "build_latency_table",
    "candidate_timer",
    "compare_latency",
    "get_target",
    "input_spec_from_onnx",
    "list_targets",
    "measure",
    "system_info",
    "write_json_atomic",
]
