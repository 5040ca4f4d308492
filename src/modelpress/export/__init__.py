"""ONNX export with measured graph optimizations and verification against torch."""

from __future__ import annotations

from modelpress.export.files import external_data_files, move_onnx, onnx_file_size
from modelpress.export.onnx import (
    OPTIMIZATIONS,
    Candidate,
    ExportResult,
    default_batches,
    export_onnx,
    infer_model_type,
    verify_onnx,
)
from modelpress.export.verify import Verification, compare_onnx, torch_reference

__all__ = [
    "OPTIMIZATIONS",
    "Candidate",
    "ExportResult",
    "Verification",
    "compare_onnx",
    "default_batches",
    "export_onnx",
    "external_data_files",
    "infer_model_type",
    "move_onnx",
    "onnx_file_size",
    "torch_reference",
    "verify_onnx",
]
