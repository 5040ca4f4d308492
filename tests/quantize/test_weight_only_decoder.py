"""The INT4 weight-only decoder with a key-value cache: packed layers lowered to MatMulNBits inside the cached
graph (no float copy of their weights), greedy generation through ONNX Runtime equal to the fake-quant torch
model's, and the int8-activation form (accuracy level 4) kept only where it still generates torch's tokens."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from modelpress.export.decoder import export_decoder
from modelpress.quantize.weight_only import WeightOnlyConfig, quantize_weights
from modelpress.quantize.weight_only_export import cpu_int8_dot, decoder_lowering

transformers = pytest.importorskip("transformers")


def _int4_gpt2():  # noqa: ANN202
    """The tests' 1.07M GPT-2 (4 blocks, hidden 128, 2048 tokens, tied head), RTN 4-bit everywhere, head too."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=2048, n_positions=128,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    quantize_weights(model, [], WeightOnlyConfig(method="rtn", head="quantize", head_bits=4), blocks=None)
    return model


def test_int4_decoder_is_lowered_to_matmulnbits_and_generates_the_fake_quant_tokens(tmp_path):
    model = _int4_gpt2()
    result = export_decoder(model, tmp_path / "decoder.onnx", new_tokens=32, lowering=decoder_lowering("auto"))
    m = onnx.load(str(result.path))
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 17  # 4 blocks x 4 layers + the LM head
    # the tied embedding: one GatherBlockQuantized over the head's own packed initializer (seen through a Reshape)
    gather = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    reshape = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Reshape"}
    head = next(n for n in nbits if n.output[0] == "logits" or "lm_head" in n.name)
    assert len(gather) == 1 and reshape[gather[0].input[0]] == head.input[1]
    assert gather[0].input[2] == head.input[2] and gather[0].input[3] == head.input[3]  # scales, zero points
    assert not [n for n in m.graph.node if n.op_type == "Gather" and n.input[0] in (head.input[1], head.input[2])]
    assert sum(len(n.input) == 6 and n.input[5] != "" for n in nbits) == 16  # Conv1D biases folded in
    # no float copy of a packed weight: the largest float initializers are the positions and the biases
    floats = [int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert max(floats) <= 128 * 128
    assert not list(m.graph.value_info)
    # strict check at accuracy level 0 (float compute on the same dequantized weights)
    v = result.verification
    assert v.tokens_equal and v.new_tokens == 32 and v.max_abs_err < 1e-4, v.describe()
    low = result.lowering
    levels = {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"}
    if cpu_int8_dot():  # int8 activations: checked again, kept when it still generates torch's tokens
        assert low["fast_form"] == "MatMulNBits accuracy_level 4" and low["kept"]
        assert low["fast_verification"]["ok"] and low["fast_verification"]["max_abs_err"] > 0
        assert levels == {4}
    else:
        assert low["fast_form"] is None and levels == {0}
    assert result.file_size_bytes < 0.3 * sum(p.numel() * 4 for p in transformers.GPT2LMHeadModel(
        model.config).parameters())
