"""Hybrid conv + attention vision models: the INT8 QDQ export matches the fake-quant torch model, and a
layer whose export cannot match is kept float (reported) instead of failing the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelpress.quantize.lowering import QDQ_MIN_COSINE, export_quantized
from modelpress.quantize.repq import RepQConfig, quantize_model

# 7-bit weights: exact U8S8 kernels on CPUs without VNNI (what quantize.repq picks there by default)
FAST = dict(act_observer="minmax", weight_observer="minmax", norm_observer="minmax", reconstruction="none",
            weight_reduce_range=True)
SIZE = 64


def tiny_mobilevit() -> torch.nn.Module:
    """MobileViT: conv stages (inverted residuals, depthwise convs) and attention blocks whose inputs and
    outputs are 1x1-conv bridges between NCHW feature maps and token sequences."""
    from transformers import MobileViTConfig, MobileViTForImageClassification

    torch.manual_seed(0)
    cfg = MobileViTConfig(image_size=SIZE, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
                          num_attention_heads=2, num_labels=4, patch_size=2, expand_ratio=2.0, mlp_ratio=2.0)
    model = MobileViTForImageClassification(cfg).eval()
    # HF's init (conv and BatchNorm weights ~ N(0, 0.02)) shrinks the signal ~1e-12x per stage: the logits
    # come out as zeros, which compare equal whatever the export computes. He-initialized convs and unit
    # BatchNorm scales keep the activations O(1).
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, generator=gen)
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    return model


class _Ctx:
    def __init__(self) -> None:
        from modelpress.progress import Reporter

        self.target = None
        self.lines: list[str] = []
        self.reporter = Reporter(quiet=True)
        self.reporter.log = self.lines.append  # keep the report lines for the assertions


def _quantized_graph():
    from modelpress.graph import ModelGraph
    from modelpress.graph.inputs import InputSpec

    model = tiny_mobilevit()
    graph = ModelGraph(model, InputSpec("image", ["pixel_values"], shape=(3, SIZE, SIZE)))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, SIZE, SIZE, generator=gen) for _ in range(2)]
    quantize_model(model, batches, graph.norm_consumers(), RepQConfig(**FAST))
    return graph


@pytest.fixture(scope="module")
def graph():
    return _quantized_graph()


def test_hybrid_qdq_export_matches_the_fake_quant_model(graph, tmp_path: Path):
    from modelpress.quantize.fakequant import QuantConv2d

    convs = [m for m in graph.module.modules() if isinstance(m, QuantConv2d)]
    assert any(m.conv.groups > 1 for m in convs)  # depthwise convs are quantized too
    out = export_quantized(graph, tmp_path / "q.onnx", _Ctx())
    assert out.verification["min_cosine"] >= QDQ_MIN_COSINE, out.verification
    assert out.verification["relative_error"] < 0.1, out.verification
    assert not out.float_fallback
    assert out.integer_kernels >= len(convs)


def test_a_layer_that_cannot_export_falls_back_to_float(graph, tmp_path: Path, monkeypatch):
    from modelpress.quantize.fakequant import QuantConv2d
    from modelpress.quantize.quantizers import export_active

    name = next(n for n, m in graph.module.named_modules()
                if isinstance(m, QuantConv2d) and "conv_projection" in n)  # attention -> conv bridge
    layer = graph.module.get_submodule(name)
    right = layer.quantized_weight

    def wrong() -> torch.Tensor:  # a lowering bug: the exported quantized weight is not the simulated one
        w = right()
        return -w if export_active() and layer.weight_quantizer is not None else w

    monkeypatch.setattr(layer, "quantized_weight", wrong)
    ctx = _Ctx()
    out = export_quantized(graph, tmp_path / "q.onnx", ctx)
    assert out.verification["min_cosine"] >= QDQ_MIN_COSINE, out.verification
    assert [f["layer"] for f in out.float_fallback] == [name]
    assert "disagrees" in out.float_fallback[0]["reason"]
    assert out.float_fallback[0]["model_cosine_before"] < QDQ_MIN_COSINE
    assert layer.weight_quantizer is None and layer.input_quantizer is None  # float in torch as in ONNX
    assert any(name in line and "kept float" in line for line in ctx.lines)


def test_export_raises_when_even_float_layers_disagree(graph, tmp_path: Path, monkeypatch):
    from modelpress.errors import ModelpressError
    from modelpress.quantize import fallback, lowering, qdq

    real = qdq.verify_qdq
    monkeypatch.setattr(qdq, "verify_qdq", lambda *a, **k: {**real(*a, **k), "min_cosine": 0.0})
    monkeypatch.setattr(fallback, "diverging_layers", lambda *a, **k: [])  # straight to the bisection
    with pytest.raises(ModelpressError, match="even with the layers at fault kept float"):
        lowering.export_quantized(graph, tmp_path / "q.onnx", _Ctx())


def test_vanishing_outputs_are_compared_on_absolute_error():
    """Random-init hybrids (HF init: conv and BatchNorm weights ~ N(0, 0.02)) can shrink the signal to
    ~1e-10 at the logits: torch and ONNX Runtime then agree to 1e-17 while their cosine is rounding noise."""
    from modelpress.quantize.lowering import agrees

    noise = {"min_cosine": 0.0, "max_abs_error": 3e-17, "reference_max_abs": 4e-10}
    assert agrees(noise)
    assert not agrees({**noise, "reference_max_abs": 0.5})  # real outputs: the cosine decides
    assert not agrees({**noise, "max_abs_error": 1e-3})
    assert agrees({"min_cosine": 0.995, "max_abs_error": 0.01, "reference_max_abs": 2.0})
