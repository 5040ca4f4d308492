"""ONNX Runtime dynamic INT8 quantization as an ONNX-stage pass (weights INT8, activations quantized at run time)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from modelpress.passes import OnnxPass, PassConfig, PassResult, register


class OrtDynamicConfig(PassConfig):
    per_channel: bool = True
    op_types: list[str] = Field(default_factory=lambda: ["MatMul"])
    reduce_range: bool = False
    weight_type: str = Field("qint8", pattern="^(qint8|quint8)$")


@register
class OrtDynamicInt8(OnnxPass):
    """onnxruntime.quantization.quantize_dynamic: per-channel MatMul weights by default (NOTES: the most
    faithful of ORT's dynamic settings on MiniLM, and the fastest)."""

    name = "quantize.ort-dynamic"
    Config = OrtDynamicConfig

    def apply(self, target: Path, ctx) -> PassResult:  # noqa: ANN001
        from onnxruntime.quantization import QuantType, quantize_dynamic

        cfg = self.config
        out = Path(ctx.workdir) / f"{Path(target).stem}.int8-dynamic.onnx"
        with ctx.reporter.step("ONNX Runtime dynamic INT8 quantization"), _quiet_root_logger():
            quantize_dynamic(
                str(target),
                str(out),
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                op_types_to_quantize=list(cfg.op_types),
                weight_type=QuantType.QInt8 if cfg.weight_type == "qint8" else QuantType.QUInt8,
            )
        return PassResult(
            onnx_path=out, metrics={"quantized_ops": list(cfg.op_types), "per_channel": cfg.per_channel}
        )


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization warns through the root logger about pre-processing we skip on purpose
    (NOTES: its symbolic shape inference fails on the MiniLM export)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
