"""ONNX export with measured graph optimizations and verification against torch.

Names load on first use (PEP 562), so the torch-free modules of this package (``builders``, ``files``) import
without torch: the child process that builds a large model's export candidates needs only onnx and ONNX
Runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_WHERE = {
    "external_data_files": "files",
    "move_onnx": "files",
    "onnx_file_size": "files",
    "OPTIMIZATIONS": "onnx",
    "Candidate": "onnx",
    "ExportResult": "onnx",
    "default_batches": "onnx",
    "export_onnx": "onnx",
    "infer_model_type": "onnx",
    "verify_onnx": "onnx",
    "Verification": "verify",
    "compare_onnx": "verify",
    "torch_reference": "verify",
}

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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"modelpress.export.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
