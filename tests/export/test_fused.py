"""ONNX Runtime's fused attention in the cached decoder (export.fused): GroupQueryAttention (with its own rotary)
replaces the plain attention ops for every family an adapter covers (GPT-2, Llama GQA, Qwen2), RMS norms become
(Skip)SimplifiedLayerNormalization, the graphs generate torch's
tokens (left padding included), fall back to the plain-op graph where a family feature is not covered or the
fused graph does not verify; packed MatMulNBits siblings (q/k/v, gate/up) give the unpacked graph's logits."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.export.decoder import export_decoder, greedy_onnx, held_out_prompts, torch_greedy
from modelpress.targets import cpu_session
from tests.export.test_decoder import causal_lm

transformers = pytest.importorskip("transformers")


def _ops(path) -> Counter:  # noqa: ANN001
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _step_inputs(path) -> list[str]:  # noqa: ANN001
    """The non-constant nodes that build GroupQueryAttention's seqlens_k, total length and padding bias."""
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    todo = [i for n in g.node if n.op_type == "GroupQueryAttention" for i in (n.input[5], n.input[6], n.input[10])]
    seen: dict[int, str] = {}
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in seen:
            seen[id(n)] = n.op_type
            todo += list(n.input)
    return [op for op in seen.values() if op != "Constant"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_every_attention_is_fused_and_generates_torch_tokens(tmp_path, family):
    model = causal_lm(family)
    result = export_decoder(model, tmp_path / "decoder.onnx", new_tokens=16)
    ops = _ops(result.path)
    assert result.attention["form"].startswith("fused"), result.attention
    assert ops["GroupQueryAttention"] == 2 and ops["Softmax"] == 0  # no plain attention left
    # rotary inside GroupQueryAttention (do_rotary, its cos/sin caches), as GenAI's builder emits it
    assert ops["RotaryEmbedding"] == 0
    gqa = [n for n in onnx.load(str(result.path)).graph.node if n.op_type == "GroupQueryAttention"]
    assert all(next(a.i for a in n.attribute if a.name == "do_rotary") == (family != "gpt2") for n in gqa)
    if family != "gpt2":  # RMS norms: the first reads the embedding, the other four join a residual Add
        assert ops["SimplifiedLayerNormalization"] == 1 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert result.verification.tokens_equal and result.verification.max_abs_err < 1e-4
    # the per-step inputs from attention_mask in a dozen nodes (the traced torch ops took 30, plus 16 constants)
    assert len(_step_inputs(result.path)) <= 11, _step_inputs(result.path)
    if family == "llama":  # a left-padded batch: the pads are masked through attention_bias
        ids, mask = held_out_prompts(result.layout, 16, batch=3, seed=7)
        assert mask[-1, :3].sum() == 0
        got, _ = greedy_onnx(cpu_session(result.path), result.layout, ids, mask, 16)
        np.testing.assert_array_equal(got, torch_greedy(model, ids, mask, 16))


def test_sliding_window_attention_keeps_the_plain_graph(tmp_path):
    T = transformers
    torch.manual_seed(0)
    model = T.Qwen2ForCausalLM(T.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, vocab_size=1000, initializer_range=0.2, eos_token_id=2, bos_token_id=1,
        use_sliding_window=True, sliding_window=8, max_window_layers=0)).eval()
    with pytest.raises(ModelpressError, match="without a fused form"):
        export_decoder(model, tmp_path / "fused.onnx", fused=True, verify=False)
    assert list(tmp_path.iterdir()) == []
    result = export_decoder(model, tmp_path / "decoder.onnx", new_tokens=16)
    assert result.attention["form"] == "plain ops" and _ops(result.path)["GroupQueryAttention"] == 0
    assert result.verification.tokens_equal


def test_export_cli_chooses_the_attention_form(tmp_path, capsys):
    from modelpress.cli import main

    ckpt = tmp_path / "llama"
    causal_lm("llama").save_pretrained(ckpt)
    out = tmp_path / "plain" / "decoder.onnx"
    main(["export", str(ckpt), "-o", str(out), "--attention", "plain", "--json", "-q"])
    info = json.loads(capsys.readouterr().out)
    assert info["attention"]["form"] == "plain ops" and info["verification"]["tokens_equal"]
    assert _ops(out)["GroupQueryAttention"] == 0 and _ops(out)["Softmax"] == 2
    assert not json.loads((out.parent / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    for bad, needle in ((["--attention", "flash"], "not a choice"),
                        (["--attention", "fused", "--no-decoder"], "goes with the decoder export")):
        with pytest.raises(SystemExit) as exc:
            main(["export", str(ckpt), "-o", str(tmp_path / "bad" / "decoder.onnx"), "-q", *bad])
        err = capsys.readouterr().err
        assert exc.value.code != 0 and err.startswith("error: ") and needle in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_a_fused_graph_that_does_not_verify_falls_back_to_plain_ops(tmp_path, monkeypatch):
    from modelpress.export import fused

    real = fused.group_query_attention

    def wrong_scale(*args):  # noqa: ANN002, ANN202
        return real(*args[:-1], args[-1] * 3.0)

    monkeypatch.setattr(fused, "group_query_attention", wrong_scale)
    result = export_decoder(causal_lm("llama"), tmp_path / "decoder.onnx", new_tokens=8)
    assert result.attention["form"] == "plain ops" and "does not match torch" in result.attention["fused_rejected"]
    assert _ops(result.path)["GroupQueryAttention"] == 0 and result.verification.ok


def test_packed_matmulnbits_siblings_give_the_unpacked_logits(tmp_path):
    from modelpress.quantize.weight_only import WeightOnlyConfig, quantize_weights
    from modelpress.quantize.weight_only_export import clean_traced, decoder_lowering, pack_siblings

    model = causal_lm("qwen2")  # biased q/k/v: the biases are packed too
    quantize_weights(model, [], WeightOnlyConfig(method="rtn", block_size=32), blocks=None)
    result = export_decoder(model, tmp_path / "decoder.onnx", new_tokens=16, lowering=decoder_lowering(0))
    ops = _ops(result.path)
    # per layer: q|k|v packed, o, gate|up packed, down (the head stays float by default)
    # q|k|v feeds GroupQueryAttention packed (no Split); gate|up is split
    assert ops["MatMulNBits"] == 2 * 4 and ops["Split"] == 2 * 1
    gqa = [n for n in onnx.load(str(result.path)).graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[1] == n.input[2] == "" for n in gqa)
    assert result.verification.tokens_equal and result.verification.max_abs_err < 1e-4

    # the same export unpacked: packing changes no logit
    unpacked = tmp_path / "unpacked.onnx"
    lowering = decoder_lowering(0)
    lowering.postprocess = clean_traced  # the same fix-ups without packing
    plain = export_decoder(model, unpacked, verify=False, lowering=lowering)
    m = onnx.load(str(plain.path))
    assert _ops(plain.path)["MatMulNBits"] == 2 * 7 and pack_siblings(m) == 4
    ids, mask = held_out_prompts(result.layout, 4, batch=2)
    a = greedy_onnx(cpu_session(plain.path), plain.layout, ids, mask, 4)[1]
    b = greedy_onnx(cpu_session(result.path), result.layout, ids, mask, 4)[1]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
