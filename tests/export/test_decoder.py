"""The decoder export with a key-value cache: cached decoding in ONNX Runtime equals torch's uncached
full-sequence logits and torch ``generate``'s greedy tokens (GPT-2, Llama with grouped-query attention and a
tied head, Qwen2), the folder runs under ONNX Runtime GenAI, and bad input fails short with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.export.decoder import (
    decoder_layout,
    export_decoder,
    held_out_prompts,
    positions,
    torch_greedy,
    verify_decoder,
    write_genai_config,
)
from modelpress.targets import cpu_session

transformers = pytest.importorskip("transformers")


def causal_lm(family: str) -> torch.nn.Module:
    """A seeded small random causal LM; initializer_range 0.2 so greedy tokens vary (at 0.02 a random model
    repeats one token, and a broken cache could not change it)."""
    T = transformers
    torch.manual_seed(0)
    common = {"vocab_size": 1000, "initializer_range": 0.2, "eos_token_id": 2, "bos_token_id": 1}
    if family == "gpt2":  # Conv1D layers, learned positions, head tied to the token embedding
        m = T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common))
    elif family == "llama":  # grouped-query attention (4 query heads, 2 key-value heads), rotary, tied head
        m = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                             tie_word_embeddings=True, **common))
    else:  # qwen2: grouped-query attention with biased q/k/v projections, untied head
        m = T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                             **common))
    m.config.use_cache = False  # as modelpress loads decoders
    return m.eval()


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_cached_decode_equals_full_sequence_and_generate(tmp_path, family):
    model = causal_lm(family)
    path = tmp_path / "decoder.onnx"
    result = export_decoder(model, path, verify=False)
    layout = result.layout
    if family != "gpt2":
        assert layout.kv_heads == [2, 2] and layout.num_heads == 4  # the cache holds the key-value heads only
    v = verify_decoder(path, model, layout, new_tokens=32)
    assert v.tokens_equal and v.new_tokens == 32, v.describe()
    assert v.max_abs_err < 1e-4 and v.logits_ok, v.describe()
    assert not model.training and model.config.use_cache is False  # the export left the model as it was

    # the past matters: one decode step with the cache zeroed gives other logits than the full sequence
    ids, mask = held_out_prompts(layout, 4, batch=1)
    sess = cpu_session(path)
    feed = {"input_ids": ids, "attention_mask": mask, **layout.empty_past(1)}
    if layout.position_ids:
        feed["position_ids"] = positions(mask, ids.shape[1])
    outs = sess.run(None, feed)
    nxt = outs[0][:, -1:].argmax(-1)
    step = {"input_ids": nxt, "attention_mask": np.ones((1, ids.shape[1] + 1), np.int64)}
    if layout.position_ids:
        step["position_ids"] = np.array([[ids.shape[1]]])
    kept = sess.run(None, {**step, **dict(zip(layout.past_names, outs[1:], strict=True))})[0]
    zeroed = sess.run(None, {**step, **{n: np.zeros_like(o) for n, o in zip(layout.past_names, outs[1:], strict=True)}})[0]
    with torch.no_grad():
        full = model(input_ids=torch.as_tensor(np.concatenate([ids, nxt], 1))).logits[:, -1:].numpy()
    np.testing.assert_allclose(kept, full, atol=1e-4)
    assert np.abs(zeroed - full).max() > 0.1


def test_greedy_tokens_of_left_padded_prompts_match_generate(tmp_path):
    model = causal_lm("llama")
    path = tmp_path / "decoder.onnx"
    result = export_decoder(model, path, new_tokens=32)
    assert result.verification.ok and result.verification.prompts == [2, 12]
    from modelpress.export.decoder import greedy_onnx

    ids, mask = held_out_prompts(result.layout, 32, batch=3, seed=7)
    assert mask[-1, :3].sum() == 0  # the last prompt is left-padded
    got, _ = greedy_onnx(cpu_session(path), result.layout, ids, mask, 32)
    ref = torch_greedy(model, ids, mask, 32)
    np.testing.assert_array_equal(got, ref)
    assert len(set(ref[0].tolist())) > 8  # the tokens vary: a check that can fail


def test_two_graph_form_writes_a_prefill_graph_without_past(tmp_path):
    model = causal_lm("gpt2")
    result = export_decoder(model, tmp_path / "decoder.onnx", two_graphs=True, verify=False)
    prefill = cpu_session(result.prefill_path)
    assert [i.name for i in prefill.get_inputs()] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in prefill.get_outputs()][:3] == ["logits", "present.0.key", "present.0.value"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.prefill.onnx"]


def test_not_a_causal_lm_fails_short_and_writes_nothing(tmp_path):
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ModelpressError, match="not a causal language model"):
        export_decoder(bert.eval(), tmp_path / "decoder.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_verification_leaves_nothing_behind(tmp_path, monkeypatch):
    from modelpress.export import decoder as dec

    model = causal_lm("gpt2")
    real = dec.greedy_onnx

    def off_by_one(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        tokens, logits = real(*args, **kwargs)
        return tokens + 1, logits

    monkeypatch.setattr(dec, "greedy_onnx", off_by_one)
    with pytest.raises(ModelpressError, match="does not match torch"):
        export_decoder(model, tmp_path / "decoder.onnx", new_tokens=4)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "llama-plain"])
def test_genai_config_generates_the_tokens_of_torch(tmp_path, family):
    og = pytest.importorskip("onnxruntime_genai")
    plain = family.endswith("-plain")
    family = family.removesuffix("-plain")
    model = causal_lm(family)
    result = export_decoder(model, tmp_path / "decoder.onnx", verify=False, fused=not plain)
    written = write_genai_config(tmp_path, result.layout)
    assert written == ["genai_config.json"]
    cfg = json.loads((tmp_path / "genai_config.json").read_text())
    # GroupQueryAttention updates the cache in place: GenAI passes one buffer as past and present (a plain graph's
    # Concat makes a longer present, so sharing there fails at the first decode step)
    assert cfg["search"]["past_present_share_buffer"] is not plain
    assert cfg["model"]["type"] == {"gpt2": "llama"}.get(family, family) and cfg["model"]["decoder"]["num_key_value_heads"] == decoder_layout(
        model).kv_heads[0]

    prompt = np.random.default_rng(5).integers(3, 1000, size=(1, 10)).astype(np.int64)
    og_model = og.Model(str(tmp_path))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=10 + 32, do_sample=False)
    gen = og.Generator(og_model, params)
    gen.append_tokens(prompt)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    ref = torch_greedy(model, prompt, np.ones_like(prompt), 32)[0].tolist()
    if len(tokens) < 32:  # GenAI stops at the end-of-text token (2); torch was told not to
        assert tokens[-1] == 2
    assert tokens == ref[: len(tokens)] and len(tokens) >= 8


def test_genai_config_refuses_a_model_without_end_of_text_token():
    model = causal_lm("llama")
    layout = decoder_layout(model)
    layout.eos_token_id = None
    with pytest.raises(ModelpressError, match="end-of-text"):
        write_genai_config("/nonexistent", layout)


def test_a_tied_head_is_stored_once(tmp_path):
    import onnx

    model = causal_lm("llama")  # tie_word_embeddings: the LM head is the token embedding
    result = export_decoder(model, tmp_path / "decoder.onnx", verify=False)
    vocab_sized = [i for i in onnx.load(str(result.path)).graph.initializer if 1000 in i.dims]
    assert len(vocab_sized) == 1
    weights = sum(p.numel() for p in model.parameters()) * 4
    assert result.file_size_bytes < weights + 128 * 1024  # the weights once plus the graph; a head copy is 250 KB


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_large_decoder_streams_its_weights_once(tmp_path, monkeypatch, family):
    """A decoder of ``STREAM_MIN_BYTES`` or more is traced without its weights, which go from the live tensors to
    ``decoder.onnx.data`` unfolded (a tied head stays one tensor), and it still generates torch's tokens; the
    fused form's graph rewrite leaves the weights in their data file (never loaded)."""
    import onnx

    import modelpress.export.decoder as decoder

    monkeypatch.setattr(decoder, "STREAM_MIN_BYTES", 0)
    model = causal_lm(family)
    plain = export_decoder(model, tmp_path / "plain" / "decoder.onnx", fused=False)
    assert plain.verification.ok
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    graph = onnx.load(str(plain.path), load_external_data=False).graph
    assert not [i.name for i in graph.input if i.name not in plain.layout.input_names]  # weights are initializers
    vocab_sized = [i for i in graph.initializer if 1000 in i.dims]
    assert len(vocab_sized) == (1 if family == "llama" else 2)  # tied: one tensor; qwen2: embedding and head
    weights = sum(p.numel() for p in model.parameters()) * 4
    assert (tmp_path / "plain" / "decoder.onnx.data").stat().st_size < weights + 64 * 1024
    fused = export_decoder(model, tmp_path / "fused" / "decoder.onnx", fused=True)  # graph rewritten, data kept
    assert fused.verification.ok
    assert sorted(p.name for p in (tmp_path / "fused").iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    assert "GroupQueryAttention" in {n.op_type for n in onnx.load(str(fused.path), load_external_data=False).graph.node}
