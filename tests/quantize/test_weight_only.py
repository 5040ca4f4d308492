"""Weight-only INT4/INT8 (quantize.weight_only): MatMulNBits packing against a reference unpack written from
ONNX Runtime's spec, the exported MatMulNBits graph against the torch model (a 1M-parameter GPT-2 and the
pretrained MiniLM), block sizes that do not divide the input width (padded), the tied embedding/LM head kept
as one tensor in the saved file, and GPTQ / AWQ against round to nearest on held-out inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from modelpress.errors import ModelpressError
from modelpress.quantize.weight_only import WeightOnlyConfig, quantize_weights
from modelpress.quantize.weight_only_export import export_weight_only_onnx
from modelpress.quantize.weight_only_pack import (
    WeightOnlyEmbedding,
    WeightOnlyLinear,
    block_params,
    pack_codes,
    pack_zero_points,
    quantize_codes,
)

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------- reference unpack, from the spec only
def reference_unpack(b: np.ndarray, zp: np.ndarray | None, scales: np.ndarray, k: int, bits: int,
                     block: int) -> np.ndarray:
    """MatMulNBits' B [N, k_blocks, blob] (+ zero points, scales) -> the float weight [N, K], element by element:
    code i of a block sits in byte i * bits // 8, low bits first; zero points packed likewise along the blocks
    (absent: 2^(bits-1))."""
    n, kb, _ = b.shape
    w = np.zeros((n, k), dtype=np.float64)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    for row in range(n):
        for blk in range(kb):
            if zp is None:
                z = 1 << (bits - 1)
            else:
                byte = zp[row, blk // per_byte]
                z = (int(byte) >> (bits * (blk % per_byte))) & mask
            for i in range(block):
                col = blk * block + i
                if col >= k:
                    break
                code = (int(b[row, blk, i // per_byte]) >> (bits * (i % per_byte))) & mask
                w[row, col] = (code - z) * float(scales[row, blk])
    return w


def _matmulnbits_model(k: int, n: int, bits: int, block: int, b: np.ndarray, scales: np.ndarray,
                       zp: np.ndarray | None) -> onnx.ModelProto:
    inits = [onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(scales.astype(np.float32), "scales")]
    inputs = ["A", "B", "scales"]
    if zp is not None:
        inits.append(onnx.numpy_helper.from_array(zp, "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize(("bits", "symmetric", "k"), [(4, False, 80), (4, True, 64), (8, False, 80)])
def test_matmulnbits_packing_round_trips_bit_exactly(bits, symmetric, k):
    import onnxruntime as ort

    rng = np.random.default_rng(bits + k)
    n, block = 6, 32
    w = torch.from_numpy(rng.standard_normal((n, k)))
    scale, zero = block_params(w, bits, block, symmetric)
    codes = quantize_codes(w, scale, zero, bits, block)
    layer = WeightOnlyLinear(k, n, bits, block, symmetric, bias=False)
    layer.set_codes(codes, scale, zero)
    b = layer.qweight.numpy()
    zp = None if layer.zero_points is None else layer.zero_points.numpy()
    assert b.dtype == np.uint8 and b.shape == (n, 3 if k == 80 else 2, block * bits // 8)
    ref = reference_unpack(b, zp, scale.numpy(), k, bits, block)
    # the codes come back bit-exactly: reference weight / scale + zero point == the codes we packed
    zeros = zero.numpy().repeat(block, axis=1)[:, :k]
    np.testing.assert_array_equal(np.round(ref / scale.numpy().repeat(block, axis=1)[:, :k]) + zeros, codes.numpy())
    np.testing.assert_allclose(layer.dequantized_weight().numpy(), ref, rtol=0, atol=1e-6)
    # and ONNX Runtime's MatMulNBits reads the same weight from the same bytes
    x = rng.standard_normal((5, k)).astype(np.float32)
    sess = ort.InferenceSession(_matmulnbits_model(k, n, bits, block, b, scale.numpy(), zp).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"A": x})[0], x @ ref.T.astype(np.float32), rtol=1e-4, atol=1e-4)


def test_zero_points_pack_two_per_byte_low_first():
    z = torch.tensor([[1, 2, 3], [15, 0, 7]])
    np.testing.assert_array_equal(pack_zero_points(z, 4).numpy(), [[0x21, 0x03], [0x0F, 0x07]])
    codes = torch.tensor([[1, 2, 3, 4] * 4])
    assert pack_codes(codes, 4, 16).numpy().ravel()[:2].tolist() == [0x21, 0x43]


def _gpt2(vocab: int = 2048, seed: int = 0):  # noqa: ANN202
    """The benchmark's GPT-2 shape (4 blocks, hidden 128, 4 heads, 2048 tokens: 1.07M parameters), random."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=vocab, n_positions=128, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _ids(seed: int, n: int = 4, seq: int = 32, vocab: int = 2048) -> dict[str, torch.Tensor]:
    ids = torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, size=(n, seq)))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _ort(path, batch):  # noqa: ANN001, ANN202
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v.numpy() for k, v in batch.items() if k in names})[0]


def test_gpt2_matmulnbits_export_matches_torch_and_shares_the_tied_tensor(tmp_path):
    model = _gpt2()
    quantize_weights(model, [], WeightOnlyConfig(method="rtn", head="quantize"), blocks=None)
    assert isinstance(model.lm_head, WeightOnlyLinear) and isinstance(model.transformer.wte, WeightOnlyEmbedding)
    assert model.lm_head.qweight is model.transformer.wte.qweight
    batch = _ids(1)
    path = export_weight_only_onnx(model, _ids(0, 2, 16), tmp_path / "m.onnx", ["input_ids", "attention_mask"])
    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMulNBits") == 17  # 4 blocks x 4 layers + the LM head
    assert sum(list(t.dims) == [2048, 4, 16] for t in m.graph.initializer) == 1  # one packed embedding/head
    with torch.no_grad():
        expected = model(**batch).logits.numpy()
    got = _ort(path, batch)
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max() + 1e-5


def test_minilm_matmulnbits_export_matches_torch(minilm, tmp_path):
    g = minilm.copy()
    quantize_weights(g.module, [], WeightOnlyConfig(method="rtn", block_size=64), blocks=None)
    batch = g.example_inputs(2, 24, seed=3)
    path = export_weight_only_onnx(g.module, g.example_inputs(2, 16), tmp_path / "m.onnx", g.input_spec.names,
                                   g.input_spec.dynamic_axes())
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("MatMulNBits") == 36
    from modelpress.graph.run import run_primary

    expected = run_primary(g.module, batch).detach().numpy()
    got = _ort(path, batch)
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


def test_block_that_does_not_divide_the_width_is_padded_and_odd_layouts_are_refused(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(80, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))
    x = torch.randn(3, 80)
    quantize_weights(lin, [], WeightOnlyConfig(block_size=32, method="rtn"))
    assert lin[0].qweight.shape == (24, 3, 16) and lin[2].qweight.shape == (8, 1, 16)  # 80 -> 96, 24 -> 32
    path = export_weight_only_onnx(lin, x, tmp_path / "pad.onnx", ["input"], {"input": {0: "batch"}})
    with torch.no_grad():
        np.testing.assert_allclose(_ort(path, {"input": x}), lin(x).numpy(), atol=1e-5, rtol=0)
    for bad, what in (({"block_size": 48}, "power of two"), ({"bits": 3}, "4 or 8 bits")):
        with pytest.raises(ModelpressError, match=what):
            quantize_weights(torch.nn.Linear(80, 8), [], WeightOnlyConfig(method="rtn", **bad))


@pytest.mark.parametrize(("bits", "symmetric", "width"), [(4, False, 80), (8, True, 64)])
def test_packed_embedding_exports_as_one_gather_block_quantized(tmp_path, bits, symmetric, width):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, width), torch.nn.Linear(width, 8))
    quantize_weights(model, [], WeightOnlyConfig(bits=bits, symmetric=symmetric, method="rtn", embeddings="quantize"))
    assert isinstance(model[0], WeightOnlyEmbedding)
    ids = torch.tensor([[3, 49, 0, 7], [1, 1, 2, 30]])
    path = export_weight_only_onnx(model, ids, tmp_path / "e.onnx", ["input_ids"], {"input_ids": {0: "b", 1: "s"}})
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # one op gathers and dequantizes (80 = 3 blocks of 32: the padding is sliced off)
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops and ops.count("Slice") == (width % 32 > 0)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(path, {"input_ids": ids[:1, :3]}), model(ids[:1, :3]).numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["float", "quantize"])
def test_tied_head_stays_one_tensor_and_the_file_is_not_larger(tmp_path, head):
    import modelpress
    from modelpress.graph import InputSpec, ModelGraph
    from modelpress.models.saving import save

    model = _gpt2()
    model.save_pretrained(tmp_path / "in")
    g = modelpress.load(tmp_path / "in")
    params_in = g.num_parameters()
    quantize_weights(g.module, [], WeightOnlyConfig(method="rtn", head=head))
    out = save(ModelGraph(g.module, InputSpec.from_dict(g.input_spec.to_dict()), g.source, edits=g.edits),
               tmp_path / "out")
    size_in = (tmp_path / "in" / "model.safetensors").stat().st_size
    size_out = (out / "model.safetensors").stat().st_size
    assert size_out < 0.35 * size_in if head == "quantize" else size_out < 0.6 * size_in
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    embedding = {k for k in keys if k.startswith(("lm_head.", "transformer.wte."))}
    assert len(embedding) == (3 if head == "quantize" else 1)  # qweight, scales, zero points / one float table
    reloaded = modelpress.load(out)
    assert reloaded.num_parameters() == params_in  # every weight, as codes; a tied pair counted once
    if head == "quantize":
        assert reloaded.module.lm_head.qweight is reloaded.module.transformer.wte.qweight
    batch = _ids(5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module(**batch).logits, g.module(**batch).logits)


def _calibration_and_held_out():  # noqa: ANN202
    """4 calibration batches, a held-out batch with the float GPT-2's (seed 1) logits, and its block paths."""
    reference = _gpt2(seed=1)
    held_out = _ids(99, 8, 32)
    with torch.no_grad():
        expected = reference(**held_out).logits
    return [_ids(10 + i, 8, 32) for i in range(4)], held_out, expected, [f"transformer.h.{i}" for i in range(4)]


def test_gptq_and_awq_beat_round_to_nearest_on_held_out_inputs():
    calibration, held_out, expected, blocks = _calibration_and_held_out()
    error = {}
    for method in ("rtn", "gptq", "awq"):
        model = _gpt2(seed=1)
        result = quantize_weights(model, calibration, WeightOnlyConfig(method=method, block_size=32), blocks=blocks)
        with torch.no_grad():
            error[method] = float((model(**held_out).logits - expected).pow(2).mean())
        if method == "awq":
            assert any(v.startswith("folded into transformer.h.0.ln_1") for v in result.awq.values())
    assert error["gptq"] < 0.8 * error["rtn"], error
    assert error["awq"] < error["rtn"], error


def test_policy_keeps_layers_float_or_gives_them_eight_bits():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    result = quantize_weights(net, [], WeightOnlyConfig(method="rtn", policy={"0": "float", "2": 8}))
    assert isinstance(net[0], torch.nn.Linear) and result.layers["0"] == "float"
    assert net[2].bits == 8 and net[2].qweight.shape == (64, 2, 32) and net[3].bits == 4
    with pytest.raises(ModelpressError, match="activation bits"):
        quantize_weights(torch.nn.Sequential(torch.nn.Linear(64, 8)), [], WeightOnlyConfig(policy={"0": "w4a8"}))


def test_pass_shares_the_originals_weights_and_never_writes_them(tmp_path):
    """The pass holds one float model, not two: the compressed graph reads the original's float tensors until a
    layer is packed, and AWQ's in-place folds (norms, input columns) go to fresh storage, never the original's."""
    from types import SimpleNamespace

    import modelpress
    from modelpress.passes import Context
    from modelpress.quantize.weight_only_pass import WeightOnlyPass

    _gpt2().save_pretrained(tmp_path / "in")
    g = modelpress.load(tmp_path / "in")
    before = {k: v.clone() for k, v in g.module.state_dict().items()}
    ctx = Context(workdir=tmp_path / "w", seed=0, data=SimpleNamespace(
        calibration=SimpleNamespace(batches=[_ids(10 + i, 8, 32) for i in range(2)])))
    res = WeightOnlyPass({"method": "awq+gptq", "samples": 16, "head": "float"}).apply(g, ctx)
    assert any(v.startswith("folded into") for v in res.metrics["awq_scales"].values())
    for k, v in g.module.state_dict().items():
        assert torch.equal(v, before[k]), f"the pass wrote into the original's {k}"
    ours = {t.untyped_storage().data_ptr() for t in g.module.parameters()}
    new_float = sum(p.numel() * p.element_size() for p in res.graph.module.parameters()
                    if p.is_floating_point() and p.untyped_storage().data_ptr() not in ours)
    float_total = sum(p.numel() * p.element_size() for p in g.module.parameters())
    assert new_float < 0.05 * float_total, (new_float, float_total)


def test_head_bits_sets_the_tied_head_form_in_one_option():
    from modelpress.quantize.weight_only_pass import WeightOnlyPassConfig

    for head_bits, head, want in ((4, "float", 4), (8, "quantize", 8), ("float", "quantize", None)):
        model = _gpt2()
        result = quantize_weights(model, [], WeightOnlyConfig(method="rtn", head=head, head_bits=head_bits))
        if want is None:  # float overrides head: quantize; the tied pair stays one float tensor
            assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
            assert result.layers["lm_head"] == "float"
        else:
            assert model.lm_head.bits == want and model.lm_head.qweight is model.transformer.wte.qweight
    assert WeightOnlyPassConfig(head_bits="float").head_bits == "float"
    with pytest.raises(ModelpressError, match="head_bits"):
        quantize_weights(_gpt2(), [], WeightOnlyConfig(method="rtn", head_bits=2))


def test_gptq_quantizes_a_tied_head_on_its_inputs_and_keeps_one_tensor():
    """With GPTQ a tied embedding / LM head is quantized last, by GPTQ on the head's inputs, and the embedding
    gathers the same codes: the head's error on held-out text falls against round to nearest (on the 22M stdlib
    Llama at 4 bits, next-token KL 1.45e-3 -> 2.0e-4)."""
    calibration, held_out, expected, blocks = _calibration_and_held_out()
    error, layers = {}, {}
    for method in ("rtn", "gptq"):
        model = _gpt2(seed=1)
        cfg = WeightOnlyConfig(method=method, head="quantize", head_bits=4, policy={"transformer.h.*": "float"})
        layers[method] = quantize_weights(model, calibration, cfg, blocks=blocks).layers
        assert isinstance(model.transformer.wte, WeightOnlyEmbedding)
        assert model.lm_head.qweight is model.transformer.wte.qweight  # one tensor
        ids = held_out["input_ids"][:2]
        torch.testing.assert_close(model.transformer.wte(ids), model.lm_head.dequantized_weight()[ids])
        with torch.no_grad():
            error[method] = float((model(**held_out).logits - expected).pow(2).mean())
    assert "GPTQ on the head's inputs" in layers["gptq"]["transformer.wte"]
    assert error["gptq"] < 0.8 * error["rtn"], error


def test_accuracy_level_is_timed_at_batch_1_without_memory_probes(tmp_path):
    """The level choice reads the batch-1 speedup only: the timing asks for batch 1 and no memory probes (a 1B
    model's batch-8 forwards and probes cost minutes and decide nothing); the faster level is kept."""
    from types import SimpleNamespace

    import modelpress
    from modelpress.quantize.weight_only_export import export_weight_only

    _gpt2().save_pretrained(tmp_path / "in")
    g = modelpress.load(tmp_path / "in")
    quantize_weights(g.module, [], WeightOnlyConfig(method="rtn"))
    asked = []

    def measure(files, **kw):  # noqa: ANN001, ANN202
        asked.append((sorted(files), kw))
        return SimpleNamespace(speedup=lambda name, batch: 2.0 if name == "level4" else 1.0)

    out = export_weight_only(g, tmp_path / "m.onnx", SimpleNamespace(target="ort-cpu", measure=measure, reporter=None))
    assert asked == [(["level0", "level4"], {"baseline": "level0", "batch_sizes": [1], "memory": False})]
    assert out.candidates["accuracy_level"]["chosen"] == 4 and (tmp_path / "m.onnx").exists()
    assert not list(tmp_path.glob("m.level*.onnx"))  # the other level's file is gone
