"""Shared weights (ALBERT: one set of block weights run by every layer): RepQ gives a shared module one
quantizer and one reparameterization for all its uses, refuses (and reports) a norm whose uses differ,
and the QDQ export matches the fake-quant torch model."""

from __future__ import annotations

from pathlib import Path

import pytest
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
        intermediate_size=64, max_position_embeddings=128,  # the measured shapes use seq 128
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


def test_a_linear_registered_under_two_names_gets_one_wrapper():
    from torch import nn

    from modelpress.quantize.fakequant import wrap_model

    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared))
    applied = wrap_model(model)
    first, second = model[0][0], model[1][0]
    assert isinstance(first, QuantLinear) and first is second  # every use quantized, by one quantizer
    assert list(applied) == ["0.0"]


def test_magnitude_pruning_of_the_shared_block_removes_units_in_every_use(tmp_path: Path):
    """ALBERT's one block is pruned once, so every use runs the pruned block; the export matches."""
    from modelpress.compress.pipeline import Pipeline
    from modelpress.compress.recipe import Recipe
    from modelpress.passes import Context

    graph = albert_graph(tiny_albert())
    prunable = {g.name for g in graph.groups if g.prunable}
    assert {f"mlp:{LAYER}", f"head:{LAYER}.attention"} <= prunable
    recipe = Recipe.from_dict({"name": "p", "passes": [{"pass": "prune.magnitude", "ratios": {"mlp": 0.5, "head": 0.25}}],
                               "export": {"optimize": "none"}})
    report = Pipeline(recipe).run(graph, Context(workdir=tmp_path), measure=False).report
    assert report["passes"][0]["removed_units"] == {f"mlp:{LAYER}": 32, f"head:{LAYER}.attention": 1}
    assert report["export"]["compressed"]["verification"]["ok"]
    assert report["after"]["parameters"] < report["before"]["parameters"]


@pytest.mark.usefixtures("short_timing")
def test_compress_a_saved_albert_through_the_cli(tmp_path: Path, capsys):
    """The default recipe (RepQ W8A8) on a saved tiny ALBERT with its tokenizer exits 0."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from modelpress.cli import main

    ckpt = tmp_path / "albert"
    tiny_albert().save_pretrained(ckpt)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    vocab.update({f"w{i}": i for i in range(len(vocab), 200)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(ckpt)
    out = tmp_path / "out"
    main(["compress", str(ckpt), "-o", str(out), "-q", "--json"])  # returns (exit 0) or raises SystemExit
    report = json.loads(capsys.readouterr().out)
    assert report["export"]["compressed"]["verification"]["ok"]
    assert f"{LAYER}.full_layer_layer_norm" in report["passes"][0]["reparam_refused"]
    assert report["quality"]["after"]["fidelity_mean"] > 0.99


def test_a_head_tied_to_the_embedding_is_quantized_without_changing_the_embedding(tmp_path: Path):
    """GPT-2's LM head holds the token embedding's tensor: folding and GPTQ rewrite the head's weight,
    which must not change the embedding (quality lost for nothing); save/reload keeps both."""
    from modelpress.models.saving import load_saved, save
    from modelpress.passes import Context
    from modelpress.quantize.passes import RepQPass
    from tests.graph.models_zoo import fresh

    graph = fresh("gpt2")
    embedding = graph.module.transformer.wte.weight.detach().clone()
    assert graph.module.lm_head.weight is graph.module.transformer.wte.weight
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (4, 16), generator=g),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(2)]

    class Split:
        pass

    split = Split()
    split.batches = batches
    ctx = Context(workdir=tmp_path, data=type("D", (), {"calibration": split, "evaluation": None})())
    out = RepQPass({"samples": 8, "auto_channel": 0}).apply(graph, ctx).graph
    head = out.module.lm_head
    assert isinstance(head, QuantLinear) and head.own_weight
    assert torch.equal(out.module.transformer.wte.weight, embedding)  # untouched
    assert not torch.equal(head.weight, embedding)  # the head was rewritten (GPTQ / folding) in its own copy
    reloaded = load_saved(save(out, tmp_path / "saved"))
    inputs = {"input_ids": batches[0]["input_ids"], "attention_mask": batches[0]["attention_mask"]}
    with torch.no_grad():
        assert torch.allclose(reloaded.module(**inputs).logits, out.module(**inputs).logits, atol=1e-5)
    assert torch.equal(reloaded.module.transformer.wte.weight, embedding)
