"""TensorRT: the QDQ export for TensorRT follows its explicit-quantization rules (checked on any machine);
the engine build and its agreement with the torch fake-quant model need a GPU (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.export.tensorrt import build_engine, run_engine, tensorrt_available, tensorrt_problems
from modelpress.quantize.qdq import export_qdq, verify_qdq
from modelpress.quantize.repq import RepQConfig, quantize_model
from tests.quantize.test_export_qdq import FAST, _pairs
from tests.quantize.test_fakequant import text_batches, tiny_bert


def _quantized(symmetric: bool):
    model = tiny_bert()
    batches = text_batches(n=3)
    quantize_model(model, batches, _pairs(model), RepQConfig(**FAST, symmetric_activations=symmetric))
    return model, batches


def _trt_export(model, example, path: Path) -> Path:
    return export_qdq(model, example, path, activation_dtype="int8", ort_fusion=False)


def test_tensorrt_export_rules(tmp_path: Path):
    model, batches = _quantized(symmetric=True)
    path = _trt_export(model, batches[0], tmp_path / "trt.onnx")
    assert tensorrt_problems(path) == []
    check = verify_qdq(path, model, text_batches(n=2, seed=5))  # the same file runs in ONNX Runtime
    assert check["min_cosine"] > 0.999, check

    ort_model, ort_batches = _quantized(symmetric=False)  # the ONNX Runtime CPU export breaks both rules
    ort_path = export_qdq(ort_model, ort_batches[0], tmp_path / "ort.onnx")
    problems = tensorrt_problems(ort_path)
    assert any("non-standard ops" in p for p in problems) and any("zero point" in p for p in problems)


@pytest.mark.skipif(tensorrt_available(), reason="checks the error on machines without TensorRT")
def test_build_engine_without_tensorrt_says_what_to_install(tmp_path: Path):
    model, batches = _quantized(symmetric=True)
    path = _trt_export(model, batches[0], tmp_path / "trt.onnx")
    with pytest.raises(ModelpressError) as err:
        build_engine(path, tmp_path / "model.plan")
    assert "tensorrt" in str(err.value).lower()
    assert not (tmp_path / "model.plan").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_engine_matches_torch_fake_quant(tmp_path: Path):
    model, batches = _quantized(symmetric=True)
    path = _trt_export(model, batches[0], tmp_path / "trt.onnx")
    shapes = {n: ((1, 4), (4, 12), (8, 32)) for n in ("input_ids", "attention_mask", "token_type_ids")}
    engine = build_engine(path, tmp_path / "model.plan", shapes=shapes)
    assert engine.stat().st_size > 0
    for batch in text_batches(n=2, seed=5):
        with torch.no_grad():
            ref = model(**batch).last_hidden_state.numpy()
        out = run_engine(engine, {k: v.numpy() for k, v in batch.items()})["output"]
        a, b = ref.reshape(ref.shape[0], -1), out.reshape(out.shape[0], -1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() > 0.99, cos


@pytest.mark.parametrize("target, symmetric", [("tensorrt", True), ("ort-cpu", False)])
def test_repq_pass_quantizes_for_the_target(tmp_path: Path, target: str, symmetric: bool):
    """symmetric_activations: auto follows the run's target, so --target tensorrt gets zero points 0."""
    from types import SimpleNamespace

    from modelpress.passes import PASSES
    from modelpress.quantize.fakequant import activation_quantizers
    from tests.quantize.test_export_qdq import _Ctx, _graph

    ctx = _Ctx(tmp_path, text_batches(n=2))
    ctx.target = SimpleNamespace(name=target)
    res = PASSES["quantize.repq"]({**FAST, "samples": 6}).apply(_graph(tiny_bert(layers=1)), ctx)
    quantizers = [q for _, q in activation_quantizers(res.graph.module)]
    assert quantizers and all(q.symmetric == symmetric for q in quantizers)
    if symmetric:
        assert all(float(q.zero_point.abs().max()) == 0 for q in quantizers)
