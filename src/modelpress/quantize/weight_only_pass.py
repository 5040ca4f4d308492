"""The ``quantize.weight_only`` pass: packed 4- or 8-bit weights per block of input columns, activations in
float (weight_only.py), lowered to ONNX Runtime's MatMulNBits (weight_only_export.py)."""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

from pydantic import Field

from modelpress.passes import GraphPass, PassConfig, PassResult, register


class WeightOnlyPassConfig(PassConfig):
    bits: Literal[4, 8] = 4
    block_size: int = Field(32, ge=16, le=4096)
    symmetric: bool = False
    method: Literal["rtn", "gptq", "awq", "awq+gptq"] = "gptq"
    act_order: bool = True
    damp: float = Field(0.01, gt=0.0, le=1.0)
    awq_grid: int = Field(20, ge=1, le=100)
    # activation-aware scales with no exact norm to fold into: an input Mul before MatMulNBits, or none
    awq_unfoldable: Literal["mul", "skip"] = "mul"
    # the LM head (output embedding) and the embedding tables: float, or quantized (a tied pair: once)
    head: Literal["float", "quantize"] = "float"
    # the head's form (a tied embedding's too): 4 or 8 bits, or float; overrides ``head`` when given. The head
    # carries most of a small LM's 4-bit error, and is the largest matrix a decode step reads
    head_bits: Literal[4, 8, "float"] | None = None
    embeddings: Literal["float", "quantize"] = "float"
    # a tied embedding / LM head under GPTQ: "loss" weighs each row's embedding look-ups into its Hessian
    # (quantize/tied_rows.py: stdlib Llama 4-bit pair, KL 2.0e-4 -> 8.8e-5), "head" fits the head's output alone
    tied_objective: Literal["loss", "head"] = "loss"
    # per-layer overrides: name or glob -> "float", 4 or 8 (the last matching entry wins)
    policy: dict[str, Any] = Field(default_factory=dict)
    samples: int = Field(128, ge=1, le=4096)
    # MatMulNBits' compute type: "auto" times 0 (float) against 4 (int8) on the target; or a level
    accuracy_level: Literal["auto", 0, 1, 2, 3, 4] = "auto"


@register
class WeightOnlyPass(GraphPass):
    """Weight-only quantization (RTN, GPTQ, AWQ-style scales), block by block in execution order; exported as
    MatMulNBits. The saved model stores the packed codes (two 4-bit codes per byte) and scales."""

    name = "quantize.weight_only"
    Config = WeightOnlyPassConfig

    def apply(self, graph: Any, ctx: Any) -> PassResult:
        from modelpress.quantize.passes import calibration_batches
        from modelpress.quantize.weight_only import WeightOnlyConfig, quantize_weights
        from modelpress.quantize.weight_only_export import decoder_lowering, export_weight_only

        cfg = self.config
        values = cfg.model_dump()
        batches = calibration_batches(ctx, cfg.samples) if cfg.method != "rtn" else []
        # the original's weights until a layer is packed (packing replaces the module; the few in-place writes,
        # AWQ's folds and input Mul, clone first): the pass holds one float model, not two (issue 22's 1B budget)
        out = graph.copy(share_weights=True) if hasattr(graph, "own_weights") else graph.copy()
        blocks = [b.path for b in (out.blocks() if callable(out.blocks) else out.blocks)] if hasattr(out, "blocks") else None
        wo = WeightOnlyConfig(**{k: v for k, v in values.items() if k not in ("samples", "accuracy_level")},
                              seed=getattr(ctx, "seed", 0))
        result = quantize_weights(out.module, batches, wo, blocks=blocks, reporter=getattr(ctx, "reporter", None))
        if hasattr(out, "invalidate"):
            out.invalidate()
        quantized = [n for n, v in result.layers.items() if v != "float"]
        metrics = {
            "layers": result.layers,
            "quantized_layers": len(quantized),
            "method": cfg.method,
            "tied_head": result.tied,
            "weight_bytes": {"before": result.float_bytes, "after": result.packed_bytes},
            "mean_relative_output_error": _mean(result.errors),
            "mean_relative_output_error_rtn": _mean(result.rtn_errors),
            "awq_scales": result.awq or None,
            "calibration_samples": sum(
                int(next(iter(b.values())).shape[0]) if isinstance(b, dict) else int(b.shape[0]) for b in batches
            ),
        }
        return PassResult(graph=out, metrics=metrics,
                          exporter=partial(export_weight_only, accuracy_level=cfg.accuracy_level),
                          decoder_lowering=decoder_lowering(cfg.accuracy_level))


def _mean(d: dict[str, float]) -> float | None:
    return sum(d.values()) / len(d) if d else None
