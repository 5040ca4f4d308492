"""Causal language models through `modelpress compress` (the default recipe, RepQ int8): a tiny random GPT-2
(transformers' Conv1D layers, a tokenizer without a pad token, text data) and a tiny Llama with grouped-query
attention (no tokenizer, inputs from an .npz) end with the language-model metrics in the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import modelpress
from modelpress.cli import main
from modelpress.data import onnx_runner, packaged_sentences, torch_runner

transformers = pytest.importorskip("transformers")


def _tokenizer(vocab_size: int):
    """A byte-level BPE trained offline on the packaged sentences, with eos and without a pad token."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"], show_progress=False
    )
    tok.train_from_iterator(packaged_sentences("train"), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def _quality(report: dict) -> tuple[dict, dict]:
    assert report["task"] == "language-model"
    return report["quality"]["before"], report["quality"]["after"]


def test_conv1d_is_quantized_like_a_linear():
    from modelpress.quantize.fakequant import QuantLinear, set_quant_state, wrap_model

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    applied = wrap_model(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantLinear)
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"} <= set(applied)
    set_quant_state(model, weights=False, activations=False)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.usefixtures("short_timing")
def test_compress_gpt2_with_text(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(ckpt)
    tok = _tokenizer(500)
    assert tok.pad_token_id is None
    tok.save_pretrained(ckpt)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(packaged_sentences("evaluation")[:48]))
    out = tmp_path / "out"
    main(["compress", str(ckpt), "--data", f"text:{text}", "-o", str(out), "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    before, after = _quality(report)
    assert before["next_token_kl"] < 1e-5 and before["top1_agreement"] > 0.999  # the float export
    assert 0.0 <= after["next_token_kl"] < 0.01 and after["top1_agreement"] > 0.9
    assert after["perplexity"] == pytest.approx(after["reference_perplexity"], rel=0.05)
    layers = report["passes"][0]["layers"]
    assert layers["transformer.h.0.attn.c_attn"] == "w8a8" and layers["transformer.h.1.mlp.c_proj"] == "w8a8"
    assert report["after"]["file_bytes"] < 0.7 * report["before"]["file_bytes"]  # Conv1D weights are int8
    assert "top-1 agreement" in (out / "report.md").read_text()

    g = modelpress.load(out)  # the fake-quant Conv1D layers reload and agree with the ONNX file
    assert g.module.config.use_cache is False
    assert g.input_spec.names == ["input_ids", "attention_mask"]  # GPT-2 has no token-type embedding
    batch = {"input_ids": np.random.default_rng(3).integers(0, 500, size=(2, 16))}
    batch["attention_mask"] = np.ones_like(batch["input_ids"])
    np.testing.assert_allclose(onnx_runner(out / "model.onnx")(batch), torch_runner(g.module, g.input_spec.names)(batch),
                               atol=2e-2)


@pytest.mark.usefixtures("short_timing")
def test_compress_llama_with_grouped_query_attention(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "llama"
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(ckpt)
    ids = np.random.default_rng(0).integers(0, 1000, size=(48, 24))
    mask = np.ones_like(ids)
    mask[::3, 18:] = 0  # some padded samples
    np.savez(tmp_path / "ids.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "out"
    main(["compress", str(ckpt), "--data", f"tensors:{tmp_path / 'ids.npz'}", "-o", str(out), "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    before, after = _quality(report)
    assert before["next_token_kl"] < 1e-5 and before["top1_agreement"] > 0.999
    assert 0.0 <= after["next_token_kl"] < 0.01 and after["top1_agreement"] > 0.9
    assert set(report["passes"][0]["layers"].values()) == {"w8a8"}
    assert "perplexity" in after and "reference_perplexity" in after
