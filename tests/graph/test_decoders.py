"""Decoder families on the graph: GPT-2 (Conv1D, fused qkv, tied LM head) and Llama (grouped-query
attention, rotary embeddings, gated MLP, RMSNorm, tied and untied LM head).

A Llama head group's unit is one key/value head with the query heads that read it (here 2 per
key/value head); removing units of every kind and a whole block keeps the model runnable,
reloadable and exportable, with head counts kept right in the modules and the config.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.graph import adapters
from modelpress.models import load_saved, save
from tests.graph.models_zoo import fresh, traced
from tests.graph.test_edits import _assert_weights_follow_lineage

DECODERS = ["gpt2", "llama", "llama_tied"]
HEAD_DIM = 16


def _original(family: str):
    """The session's traced original (read only)."""
    return traced(family)


def _fresh(family: str):
    """A copy of the traced original (discovery carried over: no re-trace per test). The original is traced
    when first asked for; a cached but untraced original would let every copy trace again."""
    return fresh(family)


def _inputs(graph, seed: int = 3):
    return graph.example_inputs(2, 12, seed=seed)


def _heads(graph):
    return [g for g in graph.groups if g.kind == "head"]


def _residual(graph):
    return next(g for g in graph.groups if g.kind == "embedding")


@pytest.mark.parametrize("family", DECODERS)
def test_groups_of_decoders(family):
    g = _fresh(family)
    assert g.propagation.opaque_ops == []  # rotary cos/sin included
    assert {x.kind for x in g.groups if x.prunable} >= {"head", "mlp", "embedding"}
    assert [b.path for b in g.blocks] == (
        ["transformer.h.0", "transformer.h.1"] if family == "gpt2" else ["model.layers.0", "model.layers.1"]
    )
    heads = _heads(g)
    assert len(heads) == 2 and all(h.prunable for h in heads)
    for h in heads:
        assert h.query_heads == 4 and h.head_dim() == HEAD_DIM
    rows = g.summary()["blocks"]
    assert [(r["heads"], r["head_dim"], r.get("kv_heads")) for r in rows] == (
        [(4, 16, None)] * 2 if family == "gpt2" else [(4, 16, 2)] * 2
    )


def test_gpt2_head_spans_fused_qkv_columns_of_conv1d():
    g = _fresh("gpt2")
    h = g.group("head:transformer.h.0.attn")
    assert (h.size, h.heads_per_unit, h.kv_heads_per_unit) == (4, 1, 1)
    for j, unit in enumerate(h.units):
        # Conv1D weights are [in, out]: a head is q, k and v output columns of c_attn, rows of c_proj
        cols = np.concatenate([np.arange(part * 64 + j * 16, part * 64 + (j + 1) * 16) for part in range(3)])
        assert unit[("transformer.h.0.attn.c_attn.weight", 1)].tolist() == cols.tolist()
        assert unit[("transformer.h.0.attn.c_attn.bias", 0)].tolist() == cols.tolist()
        assert unit[("transformer.h.0.attn.c_proj.weight", 0)].tolist() == list(range(j * 16, (j + 1) * 16))
    mlp = g.group("mlp:transformer.h.0.mlp")
    assert mlp.size == 256 and set(mlp.slots) == {
        ("transformer.h.0.mlp.c_fc.weight", 1), ("transformer.h.0.mlp.c_fc.bias", 0),
        ("transformer.h.0.mlp.c_proj.weight", 0),
    }


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_llama_gqa_unit_is_one_kv_head_with_its_query_heads(family):
    g = _fresh(family)
    for layer in (0, 1):
        attn = f"model.layers.{layer}.self_attn"
        h = g.group(f"head:{attn}")
        assert (h.size, h.heads_per_unit, h.kv_heads_per_unit, h.kv_heads) == (2, 2, 1, 2)
        assert set(h.slots) == {(f"{attn}.{p}_proj.weight", 0 if p != "o" else 1) for p in "qkvo"}
        for j, unit in enumerate(h.units):
            # key/value head j is read by query heads 2j and 2j+1 (transformers' repeat_kv order)
            queries = list(range(2 * j * HEAD_DIM, (2 * j + 2) * HEAD_DIM))
            kv = list(range(j * HEAD_DIM, (j + 1) * HEAD_DIM))
            assert unit[(f"{attn}.q_proj.weight", 0)].tolist() == queries
            assert unit[(f"{attn}.o_proj.weight", 1)].tolist() == queries
            assert unit[(f"{attn}.k_proj.weight", 0)].tolist() == kv
            assert unit[(f"{attn}.v_proj.weight", 0)].tolist() == kv
        mlp = g.group(f"mlp:model.layers.{layer}.mlp")
        assert mlp.size == 128 and set(mlp.slots) == {
            (f"model.layers.{layer}.mlp.gate_proj.weight", 0), (f"model.layers.{layer}.mlp.up_proj.weight", 0),
            (f"model.layers.{layer}.mlp.down_proj.weight", 1),
        }
    # rotary tables are per head_dim: their frequencies are fixed and no group splits a head
    rotary = next(x for x in g.groups if ("model.rotary_emb.inv_freq", 0) in x.slots)
    assert not rotary.prunable and rotary.meta.get("fixed")
    for x in g.groups:
        if any(p.endswith(("q_proj.weight", "k_proj.weight")) and a == 0 for p, a in x.slots):
            assert x.kind == "head"


@pytest.mark.parametrize("family", DECODERS)
def test_residual_stream_holds_norms_and_tied_embeddings(family):
    g = _fresh(family)
    res = _residual(g)
    assert res.size == 64 and res.prunable and not res.meta["at_output"]  # the LM head reads it
    slots = set(res.slots)
    norms = [n for n, m in g.module.named_modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))]
    assert norms and all((f"{n}.weight", 0) in slots for n in norms)
    if family == "gpt2":
        assert ("transformer.wte.weight", 1) in slots and ("transformer.wpe.weight", 1) in slots
    else:
        assert ("model.embed_tokens.weight", 1) in slots
    # a tied LM head is the embedding itself (one parameter); an untied one reads the stream
    assert (("lm_head.weight", 1) in slots) == (family == "llama")
    # vocabulary rows are addressed by token ids: never a removable group
    vocab = [x for x in g.groups if any(a == 0 and ("wte" in p or "embed_tokens" in p or "lm_head" in p)
                                        for p, a in x.slots)]
    assert vocab and all(not x.prunable for x in vocab)


def test_base_decoder_residual_stream_reaches_the_output():
    import transformers as T

    from modelpress.graph import ModelGraph
    from modelpress.models.loaders import hf_input_spec

    torch.manual_seed(0)
    m = T.GPT2Model(T.GPT2Config(vocab_size=1000, n_embd=64, n_layer=1, n_head=4, n_positions=64, use_cache=False))
    g = ModelGraph(m.eval(), hf_input_spec(m), {"kind": "hf", "class": "GPT2Model", "config": m.config.to_dict()})
    res = _residual(g)
    assert res.meta["at_output"] and not res.prunable
    with pytest.raises(ValueError, match="force=True"):
        g.remove(res.name, [0])
    g.remove(res.name, [0, 5], force=True)
    assert g.forward(_inputs(g)).shape == (2, 12, 62)


@pytest.mark.parametrize("family", DECODERS)
def test_removing_zeroed_units_is_exact(family):
    g = _fresh(family)
    state = g.state()
    plan = []
    with torch.no_grad():
        for grp in g.groups:
            if grp.prunable and grp.kind in ("head", "mlp"):
                units = [0] if grp.kind == "head" else [1, 7, grp.size - 1]
                for u in units:
                    for (param, axis), idx in grp.units[u].items():
                        state[param].index_fill_(axis, torch.as_tensor(idx), 0.0)
                plan.append((grp.name, units))
    x = _inputs(g)
    before = g.forward(x)
    g.remove_many(plan)
    torch.testing.assert_close(g.forward(x), before, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", DECODERS)
def test_permuting_every_group_is_exact(family):
    g = _fresh(family)
    rng = np.random.default_rng(7)
    x = _inputs(g)
    before = g.forward(x)
    permuted = {grp.kind for grp in g.groups if grp.prunable}
    for grp in g.groups:
        if grp.prunable:
            g.permute(grp.name, rng.permutation(grp.size))
    assert permuted >= {"head", "mlp", "embedding"}
    torch.testing.assert_close(g.forward(x), before, atol=1e-5, rtol=1e-5)


def _edit_all_kinds(g) -> None:
    """Heads (non-uniform), MLP units, residual channels, then a whole block."""
    heads = _heads(g)
    g.remove(heads[0].name, [0] if heads[0].size == 2 else [1, 2])
    g.remove(heads[1].name, [1])
    for grp in g.groups_of_kind("mlp"):
        g.remove(grp.name, list(range(0, grp.size, 3)))
    res = _residual(g)
    g.remove(res.name, list(range(0, res.size, 8)), force=True)
    g.remove_block(g.blocks[0].path)


@pytest.mark.parametrize("family", DECODERS)
def test_edited_decoder_runs_reloads_and_exports(family, tmp_path):
    import onnxruntime as ort

    from modelpress.export import export_onnx

    g = _fresh(family)
    _edit_all_kinds(g)
    assert len(g.blocks) == 1
    x = _inputs(g)
    out = g.forward(x)
    assert out.shape == (2, 12, 1000) and torch.isfinite(out).all()
    _assert_weights_follow_lineage(g, _original(family))
    if family != "llama":  # the LM head is still the embedding
        emb = g.module.get_input_embeddings().weight
        assert g.module.get_output_embeddings().weight is emb and emb.shape == (1000, 56)

    save(g, tmp_path / "saved")
    again = load_saved(tmp_path / "saved")
    torch.testing.assert_close(again.forward(x), out, atol=1e-6, rtol=1e-6)
    assert again.summary()["blocks"] == g.summary()["blocks"]
    if family != "llama":
        assert again.module.get_output_embeddings().weight is again.module.get_input_embeddings().weight

    result = export_onnx(again.module, again.input_spec, tmp_path / "m.onnx", optimize="none")
    assert result.verification.ok
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: x[i.name].numpy() for i in sess.get_inputs()}
    np.testing.assert_allclose(sess.run(None, feed)[0], out.numpy(), atol=1e-4, rtol=1e-3)


def test_gqa_head_counts_follow_edits_in_modules_and_config(tmp_path):
    g = _fresh("llama")
    g.remove("head:model.layers.0.self_attn", [1])
    cfg = g.module.config
    # per layer: the config holds the largest counts and the per-layer ones beside them
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.modelpress_widths["num_attention_heads"] == [2, 4]
    assert cfg.modelpress_widths["num_key_value_heads"] == [1, 2]
    assert adapters.attention_heads(g.module) == [2, 4] and adapters.kv_heads(g.module) == [1, 2]
    assert adapters.head_sizes(g.module) == [16, 16]
    attn = g.module.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (32, 16, 32)
    assert attn.num_key_value_groups == 2  # whole groups go: queries per key/value head stay
    g.remove("head:model.layers.1.self_attn", [0])
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1)
    assert not hasattr(cfg, "modelpress_widths")
    x = _inputs(g)
    save(g, tmp_path / "saved")
    torch.testing.assert_close(load_saved(tmp_path / "saved").forward(x), g.forward(x), atol=1e-6, rtol=1e-6)


def test_gpt2_head_attributes_follow_edits():
    g = _fresh("gpt2")
    g.remove("head:transformer.h.1.attn", [0, 3])
    attn = g.module.transformer.h[1].attn
    assert (attn.num_heads, attn.split_size, attn.head_dim) == (2, 32, 16)
    assert attn.c_attn.nf == 96
    assert adapters.attention_heads(g.module) == [4, 2]
    assert g.module.config.modelpress_widths["num_attention_heads"] == [4, 2]
    assert torch.isfinite(g.forward(_inputs(g))).all()


def test_eager_attention_finds_the_same_groups():
    """transformers' eager attention (repeat_kv + matmul) and sdpa give the same GQA groups."""
    from modelpress.graph import ModelGraph

    sdpa = _fresh("llama")
    eager = _fresh("llama").module
    eager.set_attn_implementation("eager")
    traced = ModelGraph(eager, sdpa.input_spec, sdpa.source)
    table = [(x.name, x.kind, x.prunable, x.meta.get("query_heads"), x.meta.get("kv_heads"),
              [{k: v.tolist() for k, v in u.items()} for u in x.units]) for x in sdpa.groups]
    assert [(x.name, x.kind, x.prunable, x.meta.get("query_heads"), x.meta.get("kv_heads"),
             [{k: v.tolist() for k, v in u.items()} for u in x.units]) for x in traced.groups] == table


class _GQAAttention(torch.nn.Module):
    """Grouped-query attention through sdpa's own enable_gqa (no repeat of k and v in the graph)."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = torch.nn.Linear(dim, heads * self.head_dim)
        self.k_proj = torch.nn.Linear(dim, kv_heads * self.head_dim)
        self.v_proj = torch.nn.Linear(dim, kv_heads * self.head_dim)
        self.o_proj = torch.nn.Linear(heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return x + self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


def test_sdpa_enable_gqa_groups_and_attributes():
    from modelpress.graph import InputSpec, ModelGraph

    torch.manual_seed(0)
    g = ModelGraph(_GQAAttention().eval(), InputSpec("tensor", ["x"], shape=(6, 32)))
    (h,) = _heads(g)
    assert (h.size, h.heads_per_unit, h.kv_heads_per_unit, h.head_dim()) == (2, 2, 1, 8)
    assert h.units[1][("q_proj.weight", 0)].tolist() == list(range(16, 32))
    assert h.units[1][("k_proj.weight", 0)].tolist() == list(range(8, 16))
    x = g.example_inputs(2)
    with torch.no_grad():
        for (param, axis), idx in h.units[0].items():
            g.state()[param].index_fill_(axis, torch.as_tensor(idx), 0.0)
    before = g.forward(x)
    g.remove(h, [0])
    assert (g.module.num_heads, g.module.num_key_value_heads) == (2, 1)
    torch.testing.assert_close(g.forward(x), before, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_block_deletion_keeps_the_kv_cache_indexed(family, tmp_path):
    """Later blocks take the deleted one's layer index: cached generation equals uncached, after reload too."""
    g = _fresh(family)
    g.remove_block(g.blocks[0].path)
    save(g, tmp_path / "saved")
    ids = torch.tensor([[1, 5, 7, 9]])
    for module in (g.module, load_saved(tmp_path / "saved").module):
        module.config.use_cache = True
        cached = module.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        plain = module.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
        assert cached.tolist() == plain.tolist()
