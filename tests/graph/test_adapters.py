"""Model-family facts: per-layer heads after non-uniform pruning, ORT model types, sample-input defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.graph import InputSpec, adapters
from tests.graph.models_zoo import build, fresh


def tiny_gpt2(vocab_size: int = 500) -> torch.nn.Module:
    """A seeded 2-layer GPT-2 without a cache (its config keeps GPT-2's bos/eos id 50256)."""
    import transformers as T

    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False)
    return T.GPT2Model(config).eval()


def test_heads_per_layer_follow_nonuniform_pruning():
    g = fresh("bert")
    g.remove("head:encoder.layer.0.attention", [0, 2])
    g.remove("head:encoder.layer.1.attention", [3])
    assert adapters.attention_heads(g.module) == [2, 3]
    assert g.module.config.num_attention_heads == 3  # the config can hold only the largest count
    assert adapters.head_sizes(g.module) == [16, 16]
    assert adapters.hidden_size(g.module) == 64


def test_heads_of_other_families():
    assert adapters.attention_heads(build("distilbert").module) == [4, 4]
    assert adapters.attention_heads(build("fused").module) == [4, 4]
    assert adapters.head_sizes(build("fused").module) == [16, 16]
    gpt2 = tiny_gpt2()
    assert adapters.attention_heads(gpt2) == [4, 4] and adapters.head_sizes(gpt2) == [16, 16]
    assert adapters.hidden_size(gpt2) == 64
    assert adapters.attention_heads(build("resnet").module) == []


def test_ort_model_types_per_family():
    assert adapters.ort_model_type(build("bert").module) == "bert"
    assert adapters.ort_model_type(build("distilbert").module) == "bert"
    assert adapters.ort_model_type(build("vit").module) == "vit"
    assert adapters.ort_model_type(tiny_gpt2()) == "gpt2"  # not BERT's fusions
    assert adapters.ort_model_type(build("resnet").module) is None
    assert adapters.ort_model_type(build("fused").module) is None  # no family known: no transformer optimizer


def test_sample_inputs_of_a_small_vocab_stay_in_range():
    from modelpress.models.loaders import hf_input_spec

    gpt2 = tiny_gpt2(vocab_size=300)
    spec = hf_input_spec(gpt2)
    assert spec.vocab_size == 300
    assert "bos" not in spec.special_ids  # the config's 50256 lies outside the shrunken vocabulary
    ids = spec.make(4, 32, seed=3)["input_ids"]
    assert ids.min() >= 0 and ids.max() < 300
    with torch.no_grad():
        gpt2(**spec.make_torch(2, 16))  # the embedding accepts every sampled id


def test_sample_inputs_use_the_tokenizers_vocab_and_cls(tmp_path):
    import transformers as T

    from modelpress.models import load

    words = ["[PAD]", "[UNK]", "[SEP]", "[MASK]", "[CLS]", *[f"w{i}" for i in range(35)]]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = T.BertTokenizer(str(tmp_path / "vocab.txt"))
    g = build("bert")  # embedding of 500 rows, tokenizer of 40 tokens
    g.module.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    spec = load(f"hf:{tmp_path}").input_spec
    assert spec.vocab_size == 40
    assert spec.special_ids["cls"] == 4 and spec.special_ids["pad"] == 0
    ids = spec.make(2, 24, seed=0)["input_ids"]
    assert (ids[:, 0] == 4).all() and ids.max() < 40
    assert InputSpec.from_dict(spec.to_dict()) == spec  # saved specs keep the ids


def test_bert_sample_inputs_unchanged(minilm):
    names = ["input_ids", "attention_mask", "token_type_ids"]
    legacy = InputSpec("text", names)  # a hand-made spec: BERT's vocabulary and [CLS]
    ids = legacy.make(2, 16, seed=1)["input_ids"]
    assert (ids[:, 0] == 101).all() and ids[:, 1:].min() >= 1000 and ids.max() < 30522
    assert minilm.input_spec.special_ids["cls"] == 101 and minilm.input_spec.vocab_size == 30522
    loaded = minilm.input_spec.make(2, 16, seed=1)
    for name in names:
        np.testing.assert_array_equal(loaded[name], legacy.make(2, 16, seed=1)[name])


@pytest.mark.parametrize("vocab", [50, 500])
def test_hand_made_small_vocab_specs_stay_in_range(vocab):
    ids = InputSpec("text", ["input_ids"], vocab_size=vocab).make(3, 20, seed=0)["input_ids"]
    assert ids.min() >= 0 and ids.max() < vocab


def test_roberta_positions_leave_room_for_the_padding_offset():
    """RoBERTa's position ids start after the pad id: a 64-position table takes 62 tokens, and the input
    spec (summary, export checks, latency shapes) stays within it."""
    import transformers

    from modelpress.graph import ModelGraph
    from modelpress.graph.adapters import max_sequence_length
    from modelpress.models.loaders import hf_input_spec

    model = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64)).eval()
    assert max_sequence_length(model) == 62
    spec = hf_input_spec(model)
    assert spec.max_seq_len == 62 and spec.default_seq_len == 62
    assert ModelGraph(model, spec).summary()["parameters"] > 0  # ran at the default length without IndexError
