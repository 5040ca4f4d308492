"""QDQ export: matches the torch fake-quant model; ONNX Runtime picks integer kernels; passes run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import modelpress.quantize.passes  # noqa: F401 - registers the passes
from modelpress.quantize.qdq import export_qdq, integer_kernel_count, ort_kernels, verify_qdq
from modelpress.quantize.repq import RepQConfig, quantize_model
from tests.quantize.test_fakequant import text_batches, tiny_bert

FAST = dict(act_observer="minmax", weight_observer="minmax", norm_observer="minmax")


def _graph(model):
    from modelpress.graph import ModelGraph
    from modelpress.graph.inputs import InputSpec

    spec = InputSpec(
        "text", ["input_ids", "attention_mask", "token_type_ids"], vocab_size=200, default_seq_len=12
    )
    return ModelGraph(model, spec)


def _pairs(model):
    return _graph(model).norm_consumers()


@pytest.mark.parametrize(
    "attention, ort_fusion, act_dtype",
    [(False, True, "uint8"), (True, True, "uint8"), (False, False, "uint8"), (False, True, "int8")],
)
def test_qdq_export_matches_fake_quant_and_uses_integer_kernels(
    tmp_path: Path, attention: bool, ort_fusion: bool, act_dtype: str
):
    model = tiny_bert()
    batches = text_batches(n=3)
    pairs = _pairs(model)
    cfg = RepQConfig(**FAST, attention=attention, probs="uniform")
    result = quantize_model(model, batches, pairs, cfg)
    assert {g.mode for g in result.groups} == {"affine"}  # post-norm BERT: consumer-side transform
    path = export_qdq(
        model, batches[0], tmp_path / "q.onnx", ort_fusion=ort_fusion, activation_dtype=act_dtype
    )
    domains = {n.domain for n in onnx.load(str(path)).graph.node}
    assert ("com.microsoft" in domains) == ort_fusion  # bias fused into MatMulIntegerToFloat, or plain QDQ
    check = verify_qdq(path, model, text_batches(n=2, seed=5))
    assert check["min_cosine"] > 0.999 and check["relative_error"] < 0.03, check
    kernels = ort_kernels(path)
    linears = 2 * 6
    assert integer_kernel_count(kernels) >= linears + (4 if attention else 0), kernels
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) >= linears
    # weights are stored as int8 initializers with per-output-channel scales
    m = onnx.load(str(path))
    int8 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == linears


def test_reduce_range_weights_fit_in_7_bits(tmp_path: Path):
    model = tiny_bert(layers=1)
    batches = text_batches(n=2)
    quantize_model(model, batches, _pairs(model), RepQConfig(**FAST, weight_reduce_range=True))
    path = export_qdq(model, batches[0], tmp_path / "q7.onnx")
    codes = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(path)).graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
    ]
    assert codes and all(np.abs(c).max() <= 63 for c in codes)  # u8 * s7 pairs cannot saturate int16


@pytest.mark.parametrize("form", ["simulate", "uniform"])
def test_log2_attention_exports_in_a_runnable_form(tmp_path: Path, form: str):
    """ONNX has no log2 QDQ: "simulate" reproduces the torch log2 levels with float ops (matches torch
    closely), "uniform" is the 8-bit QDQ form ONNX Runtime runs with integer kernels (approximate)."""
    from modelpress.quantize.qdq import log_quantizer_count

    model = tiny_bert(layers=1)
    batches = text_batches(n=2)
    result = quantize_model(model, batches, _pairs(model), RepQConfig(**FAST, attention=True, probs="logsqrt2"))
    assert result.metrics["log2_matmuls"] == 1 and log_quantizer_count(model) == 1  # probs @ V
    path = export_qdq(model, batches[0], tmp_path / f"log-{form}.onnx", log_form=form)
    check = verify_qdq(path, model, text_batches(n=2, seed=5))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    kernels = ort_kernels(path)
    if form == "simulate":
        assert {"Log", "Round", "Exp", "Where"} <= ops
        assert check["min_cosine"] > 0.9999 and check["relative_error"] < 1e-3, check
        assert integer_kernel_count(kernels) >= 6  # the Linears stay integer; the attention matmuls are float
    else:
        assert "Log" not in ops
        assert check["min_cosine"] > 0.99, check
        assert integer_kernel_count(kernels) >= 6 + 2, kernels  # attention matmuls on integer kernels too


class _Ctx:
    def __init__(self, tmp_path: Path, batches) -> None:
        from modelpress.data.sources import DataSplit
        from modelpress.progress import QUIET

        self.workdir = tmp_path
        self.reporter = QUIET
        self.calibration = DataSplit(batches=batches)
        self.seed = 0


def test_repq_pass_returns_a_new_fake_quant_graph(tmp_path: Path):
    from modelpress.passes import PASSES
    from modelpress.quantize import is_fake_quant

    graph = _graph(tiny_bert(layers=1))
    ctx = _Ctx(tmp_path, text_batches(n=2))
    p = PASSES["quantize.repq"]({**FAST, "samples": 6, "reconstruction": "gptq", "granularity": "block"})
    res = p.apply(graph, ctx)
    assert is_fake_quant(res.graph.module) and not is_fake_quant(graph.module)
    assert res.metrics["calibration_samples"] == 6
    assert "reconstruction_error_mean" in res.metrics


def test_ort_static_pass(tmp_path: Path):
    from modelpress.passes import PASSES

    model = tiny_bert(layers=1)
    batches = text_batches(n=2)
    fp32 = export_qdq(model, batches[0], tmp_path / "fp32.onnx")
    ctx = _Ctx(tmp_path, batches)
    res = PASSES["quantize.ort-static"]({"samples": 8}).apply(fp32, ctx)
    assert res.onnx_path.is_file()
    assert integer_kernel_count(ort_kernels(res.onnx_path)) > 0


def test_nncf_pass(tmp_path: Path):
    pytest.importorskip("nncf")
    from modelpress.passes import PASSES

    model = tiny_bert(layers=1)
    batches = text_batches(n=2)
    fp32 = export_qdq(model, batches[0], tmp_path / "fp32.onnx")
    res = PASSES["quantize.nncf"]({"samples": 4}).apply(fp32, _Ctx(tmp_path, batches))
    assert res.onnx_path.is_file()
    kinds = {n.op_type for n in onnx.load(str(res.onnx_path)).graph.node}
    assert "QuantizeLinear" in kinds


def test_vit_pre_norm_folds_and_exports(tmp_path: Path):
    from transformers import ViTConfig, ViTModel

    from modelpress.graph import ModelGraph
    from modelpress.graph.inputs import InputSpec

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    pairs = ModelGraph(model, InputSpec("image", ["pixel_values"], shape=(3, 16, 16))).norm_consumers()
    x = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        ref = model(x[0]).last_hidden_state
    res = quantize_model(
        model, x, pairs, RepQConfig(**FAST, attention=True, probs="uniform", reconstruction="gptq")
    )
    assert res.groups and all(g.mode == "fold" for g in res.groups)  # pre-norm: folded into gamma/beta
    with torch.no_grad():
        out = model(x[0]).last_hidden_state
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.995
    path = export_qdq(model, x[0], tmp_path / "vit.onnx", input_names=["pixel_values"])
    check = verify_qdq(path, model, x[1:])
    assert check["min_cosine"] > 0.999, check
    assert integer_kernel_count(ort_kernels(path)) >= 2 * 6


def test_repq_pass_reduce_range_auto_follows_the_cpu(tmp_path: Path, monkeypatch):
    from modelpress.passes import PASSES
    from modelpress.quantize import passes

    graph = _graph(tiny_bert(layers=1))
    ctx = _Ctx(tmp_path, text_batches(n=1))
    monkeypatch.setattr(passes, "cpu_has_vnni", lambda: False)
    res = PASSES["quantize.repq"]({**FAST, "samples": 4, "reconstruction": "none"}).apply(graph, ctx)
    layer = res.graph.module.encoder.layer[0].intermediate.dense
    assert layer.weight_quantizer.qmax == 63  # 7-bit weights without VNNI


@pytest.mark.parametrize("act_dtype", ["uint8", "int8"])
def test_sub_8bit_activations_export_exactly_in_8bit_containers(tmp_path: Path, act_dtype: str):
    """W4A4: ONNX Runtime has no 4-bit kernels; a Clip to the 4-bit range before each 8-bit QuantizeLinear
    gives the same codes, so the export still matches the torch fake-quant model and runs integer kernels."""
    model = tiny_bert()
    batches = text_batches(n=3)
    quantize_model(model, batches, _pairs(model), RepQConfig(**FAST, default="w4a4"))
    path = export_qdq(model, batches[0], tmp_path / "w4a4.onnx", activation_dtype=act_dtype)
    assert "Clip" in {n.op_type for n in onnx.load(str(path)).graph.node}
    check = verify_qdq(path, model, text_batches(n=2, seed=5))
    assert check["min_cosine"] > 0.999 and check["relative_error"] < 0.03, check
    assert integer_kernel_count(ort_kernels(path)) >= 2 * 6


def test_streamed_qdq_export_is_the_same_model(tmp_path: Path, monkeypatch):
    """A large model's QDQ export traces without its parameters (``stream``): the graph ONNX Runtime runs, its
    outputs and its int8 weights are those of torch's own export. Models of ``STREAM_MIN_BYTES`` stream."""
    import onnxruntime as ort

    import modelpress.quantize.qdq as qdq

    streamed = []
    real = qdq.export_streamed
    monkeypatch.setattr(qdq, "export_streamed", lambda *a, **k: streamed.append(1) or real(*a, **k))

    model = tiny_bert()
    batches = text_batches(n=3)
    quantize_model(model, batches, _pairs(model), RepQConfig(**FAST, attention=True, probs="uniform"))
    paths = {s: export_qdq(model, batches[0], tmp_path / f"s{int(s)}.onnx", stream=s) for s in (False, True)}
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*.raw*"))  # one self-contained file each
    assert ort_kernels(paths[True]) == ort_kernels(paths[False])
    feed = {k: v.numpy() for k, v in text_batches(n=1, seed=5)[0].items()}
    outs = [ort.InferenceSession(str(paths[s]), providers=["CPUExecutionProvider"]).run(None, feed)[0]
            for s in (False, True)]
    np.testing.assert_array_equal(outs[0], outs[1])
    inits = {s: onnx.load(str(paths[s])).graph.initializer for s in (False, True)}
    int8 = {s: sorted(numpy_helper.to_array(t).tobytes() for t in inits[s] if t.data_type == onnx.TensorProto.INT8)
            for s in (False, True)}
    assert int8[True] == int8[False] and len(int8[True]) >= 12
    floats = {s: sum(numpy_helper.to_array(t).size for t in inits[s] if t.data_type == onnx.TensorProto.FLOAT)
              for s in (False, True)}
    assert floats[True] == floats[False]  # the same float tensors (biases, norms, embeddings), no more
    assert len(streamed) == 1
    export_qdq(model, batches[0], tmp_path / "auto.onnx")  # a small model: torch's own export
    monkeypatch.setattr(qdq, "STREAM_MIN_BYTES", 0)
    export_qdq(model, batches[0], tmp_path / "large.onnx")  # "large": streamed
    assert len(streamed) == 2
    # tensors above SMALL_ELEMS (BERT-base's int8 codes and embeddings) stay in the data file, never loaded whole:
    # here every weight matrix; the model runs the same from the file and its data
    monkeypatch.setattr(qdq, "SMALL_ELEMS", 256)
    big = export_qdq(model, batches[0], tmp_path / "big.onnx", stream=True)
    assert sorted(p.name for p in tmp_path.glob("big*")) == ["big.onnx", "big.onnx.data"]
    graph = onnx.load(str(big), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in external) >= 12
    assert all(np.prod(t.dims) > 256 for t in external)
    session = ort.InferenceSession(str(big), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feed)[0], outs[0])
    assert ort_kernels(big) == ort_kernels(paths[False])
