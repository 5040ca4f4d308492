"""Shared weights (ALBERT: one set of block weights run by every layer): RepQ gives a shared module one
quantizer and one reparameterization for all its uses, refuses (and reports) a norm whose uses differ,
and the QDQ export matches the fake-quant torch model."""

from __future__ import annotations

from pathlib import Path

import torch

from modelpress.quantize.fakequant import QuantLinear
from modelpress.quantize.qdq import export_qdq, verify_qdq
from modelpress.quantize.reparam import merge_uses
from modelpress.quantize.repq import RepQConfig, quantize_model
from tests.quantize.test_fakequant import text_batches

FAST = dict(act_observer="minmax", weight_observer="minmax", norm_observer="minmax")
LAYER = "encoder.albert_layer_groups.0.albert_layers.0"


def tiny_albert(layers: int = 3):
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    cfg = AlbertConfig(
        vocab_size=200, embedding_size=16, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )
    return AlbertModel(cfg).eval()


def albert_graph(model):
    from modelpress.graph import ModelGraph
    from modelpress.graph.inputs import InputSpec

    spec = InputSpec("text", ["input_ids", "attention_mask", "token_type_ids"], vocab_size=200, default_seq_len=12)
    return ModelGraph(model, spec)


def test_merge_uses_merges_equal_uses_and_refuses_differing_ones():
    pairs = [
        ("n1", ["a"], True), ("n1", ["a"], False), ("n1", ["a"], True),  # one norm, three equal uses
        ("n2", ["q", "k"], True), ("n2", ["k", "q"], True), ("n2", [], True),  # the last use feeds no Linear
        ("n3", ["a"], False),  # "a" already reads n1
        ("n4", ["x"], False),
    ]
    merged, refused = merge_uses(pairs)
    assert merged == [("n1", ["a"], True, True), ("n4", ["x"], False, False)]
    assert set(refused) == {"n2", "n3"}
    assert "different consumers" in refused["n2"] and "n1" in refused["n3"]


def test_repq_on_albert_shares_one_quantizer_and_exports(tmp_path: Path):
    model = tiny_albert()
    pairs = albert_graph(model).norm_consumers()
    assert sum(p[0] == f"{LAYER}.attention.LayerNorm" for p in pairs) == 3  # one entry per use
    batches = text_batches(n=3)
    result = quantize_model(model, batches, pairs, RepQConfig(**FAST))

    # the shared post-attention norm: one group, its consumer wrapped once, reparameterized on the
    # consumer side (exact for every use) with a quantizer calibrated on all three uses
    groups = {g.norm_name: g for g in result.groups}
    shared = groups[f"{LAYER}.attention.LayerNorm"]
    assert shared.mode == "affine" and shared.stats["uses"] == 3
    ffn = model.get_submodule(f"{LAYER}.ffn")
    assert isinstance(ffn, QuantLinear) and ffn.input_quantizer is shared.quantizer
    # the last norm feeds q/k/v in two uses and only the output in the third: refused, with the reason
    refused = result.metrics["reparam_refused"]
    assert "different consumers" in refused[f"{LAYER}.full_layer_layer_norm"]
    assert f"{LAYER}.full_layer_layer_norm" not in groups

    with torch.no_grad():
        fq = model(**batches[0]).last_hidden_state
    assert torch.isfinite(fq).all()
    path = export_qdq(model, batches[0], tmp_path / "albert.onnx")
    check = verify_qdq(path, model, text_batches(n=2, seed=5))
    assert check["min_cosine"] >= 0.99, check
