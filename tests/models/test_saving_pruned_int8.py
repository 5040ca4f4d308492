"""A pruned model quantized to INT8 saves and reloads: its narrowed layers' weights are saved as INT8 codes
only, so the reload takes their float shapes from the spec (``encoded_shapes``) before the config is synced
and the codes decoded."""

from __future__ import annotations

import json

import torch

from modelpress.compress import Context, Recipe
from modelpress.data import ClassificationTask, load_data
from modelpress.graph import ModelGraph
from modelpress.models import load_saved, save
from modelpress.models.loaders import SPEC_FILE

FAST_INT8 = {"pass": "quantize.repq", "samples": 16, "act_observer": "minmax", "weight_observer": "minmax",
             "reconstruction": "none", "keep_faster": False}


def _pruned_int8(graph: ModelGraph, ratios: dict[str, float], tmp_path) -> ModelGraph:  # noqa: ANN001
    """The recipe's graph passes (prune.magnitude, then RepQ INT8), as a pipeline runs them, without export."""
    data = load_data("digits", graph.input_spec, n_calibration=16, n_evaluation=None)
    rec = Recipe.from_dict({"name": "t", "passes": [{"pass": "prune.magnitude", "ratios": ratios, "reconstruct": False},
                                                     FAST_INT8]})
    ctx = Context(workdir=tmp_path / "work", task=ClassificationTask(), data=data, reference=graph)
    for p in rec.passes:
        graph = p.apply(graph, ctx).graph
    return graph


def test_a_pruned_int8_model_reloads(zoo_vit, tmp_path) -> None:  # noqa: ANN001
    zm = zoo_vit
    source = {"kind": "hf", "class": "ViTForImageClassification", "config": zm.module.config.to_dict()}
    graph = ModelGraph(zm.module, zm.input_spec, source, name="digits-vit").copy()
    out = _pruned_int8(graph, {"mlp": 0.5, "head": 0.25}, tmp_path)
    save(out, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / SPEC_FILE).read_text())
    assert spec["quantization"] and spec["encoded_shapes"]  # narrowed INT8 layers, saved as codes
    again = load_saved(tmp_path / "m")
    x = out.example_inputs(4, seed=1)
    assert again.num_parameters() == out.num_parameters() < graph.num_parameters()
    assert torch.allclose(again.forward(x), out.forward(x), atol=1e-5)
