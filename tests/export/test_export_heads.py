"""The transformer optimizer gets each family's own model type and each layer's own head count."""

from __future__ import annotations

import onnx
import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.export import export_onnx, verify_onnx
from modelpress.graph import adapters
from tests.graph.models_zoo import build, fresh
from tests.graph.test_adapters import tiny_gpt2

_QUERY_KEY = ("query.weight", "key.weight", "q_lin.weight", "k_lin.weight", "q_proj.weight", "k_proj.weight",
              "c_attn.weight")


def _sharpen(module: torch.nn.Module) -> None:
    """Scale query/key weights so attention is peaked: with random init it is near uniform, and then
    splitting a layer into the wrong number of heads gives the same output, so a check could not fail."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(_QUERY_KEY):
                p.mul_(8)


def _attention_heads(path) -> list[int]:
    model = onnx.load(str(path))
    return [
        next(a.i for a in node.attribute if a.name == "num_heads")
        for node in model.graph.node
        if node.op_type == "Attention"
    ]


def test_nonuniformly_pruned_bert_fuses_with_per_layer_heads(tmp_path):
    g = fresh("bert")
    _sharpen(g.module)
    g.remove("head:encoder.layer.0.attention", [0, 2])  # layer 0 keeps 2 heads, layer 1 all 4
    path = tmp_path / "bert.onnx"

    result = export_onnx(g.module, g.input_spec, path, optimize="transformer")

    assert result.model_type == "bert" and result.verification.ok
    assert _attention_heads(path) == [2, 4] == adapters.attention_heads(g.module)
    # the check can fail: the fused graph with the config's head count (the largest, 4) in every layer,
    # as the optimizer builds it when told only that count, does not match torch
    wrong = onnx.load(str(path))
    for node in wrong.graph.node:
        for a in node.attribute:
            if a.name == "num_heads":
                a.i = g.module.config.num_attention_heads
    onnx.save(wrong, str(tmp_path / "wrong.onnx"))
    assert not verify_onnx(tmp_path / "wrong.onnx", g.module, g.input_spec).ok


def test_gpt2_gets_its_own_optimizer_and_verifies(tmp_path):
    gpt2 = tiny_gpt2()
    _sharpen(gpt2)
    from modelpress.models.loaders import hf_input_spec

    spec = hf_input_spec(gpt2)
    assert adapters.ort_model_type(gpt2) == "gpt2"

    # as the pipeline and the CLI call it: no model type given, auto builds and verifies every candidate
    result = export_onnx(gpt2, spec, tmp_path / "gpt2.onnx", optimize="auto")
    assert result.model_type == "gpt2" and result.verification.ok
    assert result.candidates["transformer"].verified is True


@pytest.mark.parametrize(("family", "fused_attention"), [("distilbert", 2), ("vit", 0)])
def test_mapped_families_verify_after_the_optimizer(family, fused_attention, tmp_path):
    g = build(family)
    _sharpen(g.module)
    path = tmp_path / f"{family}.onnx"
    result = export_onnx(g.module, g.input_spec, path, optimize="transformer")
    assert result.model_type == adapters.ort_model_type(g.module) and result.verification.ok
    assert len(_attention_heads(path)) == fused_attention


def test_transformer_optimization_needs_a_known_family(tmp_path):
    g = build("fused")  # no Hugging Face family: unsure, so no transformer optimizer
    with pytest.raises(ModelpressError, match="model type"):
        export_onnx(g.module, g.input_spec, tmp_path / "fused.onnx", optimize="transformer")
    result = export_onnx(g.module, g.input_spec, tmp_path / "fused.onnx", optimize="auto")
    assert "transformer" not in result.candidates and result.verification.ok
