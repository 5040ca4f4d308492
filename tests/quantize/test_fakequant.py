"""Policies, wrapping, calibration, HF attention quantization, dual clipping, reconstruction, sensitivity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.quantize.fakequant import (
    QuantConfig,
    QuantLinear,
    QuantMatMul,
    activation_quantizers,
    calibrate,
    is_fake_quant,
    wrap_model,
)
from modelpress.quantize.policy import FLOAT, LayerSpec, Policy, parse_spec
from tests.quantize.blocks import Stack


def tiny_bert(layers: int = 2):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


def text_batches(n: int = 3, batch: int = 4, seq: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 200, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def test_parse_spec_forms():
    assert parse_spec(8) == LayerSpec(8, 8)
    assert parse_spec("w4a8") == LayerSpec(4, 8)
    assert parse_spec("w4") == LayerSpec(4, None)
    assert parse_spec({"a": 6}) == LayerSpec(None, 6)
    assert parse_spec("float") == FLOAT
    for bad in ("w9", 1, "int8", {"x": 1}):
        with pytest.raises(ModelpressError):
            parse_spec(bad)


def test_policy_last_match_wins_and_unmatched():
    p = Policy({"*": "w8a8", "blocks.0.*": "float", "blocks.0.fc2": 4}, default="w8a8")
    assert p.spec("head") == LayerSpec(8, 8)
    assert p.spec("blocks.0.fc1").is_float
    assert p.spec("blocks.0.fc2") == LayerSpec(4, 4)
    assert p.unmatched(["head", "blocks.0.fc1"]) == ["blocks.0.fc2"]


def test_wrap_model_follows_policy_and_calibrates():
    torch.manual_seed(0)
    model = Stack(kind="pre")
    x = [torch.randn(2, 8, 32) for _ in range(3)]
    ref = model(x[0]).detach()
    applied = wrap_model(model, {"blocks.1.*": "float", "head": "w4a8"}, QuantConfig(attention=False))
    assert isinstance(model.blocks[0].fc1, QuantLinear)
    assert isinstance(model.blocks[1].fc1, nn.Linear) and applied["blocks.1.fc1"].is_float
    assert model.head.weight_quantizer.bits == 4 and model.head.input_quantizer.bits == 8
    assert is_fake_quant(model)
    assert calibrate(model, x, observer="minmax") == len(activation_quantizers(model))
    out = model(x[0]).detach()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_hf_attention_matmuls_are_quantized():
    from modelpress.quantize import hf_attention

    model = tiny_bert()
    batches = text_batches()
    with torch.no_grad():
        ref = model(**batches[0]).last_hidden_state
    wrap_model(model, None, QuantConfig(attention=True, probs="logsqrt2"))
    assert hf_attention.is_enabled(model)
    attn = model.encoder.layer[0].attention.self
    assert isinstance(attn.attn_qk, QuantMatMul) and isinstance(attn.attn_pv, QuantMatMul)
    calibrate(model, batches, observer="minmax")
    assert attn.attn_pv.a_quantizer.calibrated and attn.attn_qk.b_quantizer.calibrated
    seen = []
    hook = attn.attn_pv.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    with torch.no_grad():
        out = model(**batches[0]).last_hidden_state
    hook.remove()
    assert seen and seen[0][-1] == seen[0][-2] == 12  # [batch, heads, seq, seq] probabilities
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99


def test_dual_clipping_lowers_block_error():
    from modelpress.quantize.clipping import collect_group_inputs, learn_dual_clipping
    from modelpress.quantize.reparam import build_groups

    torch.manual_seed(0)
    model = Stack(kind="pre")
    x = [torch.randn(4, 16, 32) for _ in range(3)]
    with torch.no_grad():
        x[0][0, 0] *= 40  # an outlier token: min/max ranges are too wide
    wrap_model(model, {"*": "w8a4"}, QuantConfig(attention=False))
    groups = build_groups(model, model.norm_pairs())
    calibrate(model, x, observer="minmax")
    inputs = collect_group_inputs(model, groups, x)
    stats = learn_dual_clipping(groups[0], inputs[0], steps=60, lr=2e-2)
    assert stats["block_error_after"] < stats["block_error_before"]
    assert groups[0].quantizer.scale.shape == (32,)


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_reconstruction_beats_round_to_nearest(method):
    from modelpress.quantize.reconstruct import reconstruct, rtn_errors

    torch.manual_seed(0)
    model = Stack(kind="pre", depth=1)
    x = [torch.randn(8, 16, 32) for _ in range(2)]
    wrap_model(model, {"*": "w3a8"}, QuantConfig(attention=False))
    calibrate(model, x, observer="minmax")
    before = rtn_errors(model, x)
    kwargs = {"iters": 150} if method == "adaround" else {}
    after = reconstruct(model, x, method=method, **kwargs)
    assert sum(after.values()) < sum(before.values())
    w = model.blocks[0].fc1
    assert torch.equal(w.weight_quantizer(w.weight), w.weight)  # weights sit on the quantizer's grid


def test_block_granularity_reconstruction_runs():
    from modelpress.quantize.reconstruct import reconstruct

    torch.manual_seed(0)
    model = Stack(kind="pre", depth=2)
    x = [torch.randn(4, 8, 32) for _ in range(2)]
    wrap_model(model, {"*": "w4a8"}, QuantConfig(attention=False))
    calibrate(model, x, observer="minmax")
    errs = reconstruct(model, x, method="gptq", granularity="block", blocks=["blocks.0", "blocks.1"])
    assert set(errs) == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_sensitivity_keeps_the_costliest_unit_float():
    from modelpress.quantize.sensitivity import choose_float_units

    torch.manual_seed(0)
    model = Stack(kind="pre", depth=1)
    reference = copy.deepcopy(model)
    x = [torch.randn(4, 8, 32) for _ in range(2)]
    wrap_model(model, {"*": "w8a8", "head": "w2a8"}, QuantConfig(attention=False))
    calibrate(model, x, observer="minmax")
    out = choose_float_units(model, reference, x, max_float=1)
    assert out["kept_float"] == ["head"]
    assert out["fidelity_after"] > out["fidelity_all_quantized"]
    assert not model.head.weight_quantizer.enabled


def test_log_sqrt2_attention_reparameterized_to_log2_in_a_model():
    from modelpress.quantize.log2 import Log2ShiftMatMul, reparameterize_log_sqrt2

    model = tiny_bert()
    batches = text_batches()
    wrap_model(model, None, QuantConfig(attention=True, probs="logsqrt2"))
    calibrate(model, batches, observer="minmax")
    with torch.no_grad():
        before = model(**batches[1]).last_hidden_state
    assert reparameterize_log_sqrt2(model) == 2
    assert reparameterize_log_sqrt2(model) == 0  # idempotent
    assert isinstance(model.encoder.layer[0].attention.self.attn_pv, Log2ShiftMatMul)
    with torch.no_grad():
        after = model(**batches[1]).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_describe_and_rebuild_round_trip():
    import json

    from modelpress.graph import ModelGraph
    from modelpress.graph.inputs import InputSpec
    from modelpress.quantize.repq import RepQConfig, quantize_model
    from modelpress.quantize.state import describe, rebuild

    model = tiny_bert()
    batches = text_batches()
    spec_in = InputSpec("text", ["input_ids", "attention_mask", "token_type_ids"], vocab_size=200)
    pairs = ModelGraph(model, spec_in).norm_consumers()
    cfg = RepQConfig(act_observer="minmax", weight_observer="minmax", attention=True, probs="logsqrt2")
    quantize_model(model, batches, pairs, cfg)
    spec = json.loads(json.dumps(describe(model)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = rebuild(tiny_bert(), spec)
    fresh.load_state_dict(state, strict=True)
    assert describe(fresh) == spec
    with torch.no_grad():
        a = model(**batches[1]).last_hidden_state
        b = fresh(**batches[1]).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)
