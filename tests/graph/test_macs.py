"""MAC counting runs on models that pass a parameter as a module's input (DeBERTa's relative embeddings),
where torch's flop counter fails under no_grad: `modelpress inspect` crashed there."""

from __future__ import annotations

import pytest
import torch

from modelpress.graph import ModelGraph

transformers = pytest.importorskip("transformers")


def test_summary_counts_macs_of_a_deberta_v2():
    from modelpress.models.loaders import hf_input_spec

    torch.manual_seed(0)
    cfg = transformers.DebertaV2Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=64, relative_attention=True,
                                       position_buckets=16, pos_att_type=["p2c", "c2p"], share_att_key=True)
    model = transformers.DebertaV2Model(cfg).eval()
    graph = ModelGraph(model, hf_input_spec(model), {"kind": "hf", "class": "DebertaV2Model"}, name="deberta")
    summary = graph.summary()
    # two layers of q/k/v/o (4 x 64 x 64) and MLP (2 x 64 x 128) per token: the Linears alone
    seq = graph.input_spec.default_seq_len
    assert summary["macs"] > 2 * seq * (4 * 64 * 64 + 2 * 64 * 128)
