"""Recipes validate; magnitude pruning keeps the most important units; the pipeline runs end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.compress.pipeline import Pipeline
from modelpress.compress.recipe import Recipe, builtin_recipes, load_recipe
from modelpress.data.saliency import magnitude
from modelpress.errors import ModelpressError
from modelpress.passes import Context


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipes_validate(name):
    r = load_recipe(name)
    assert r.name == name
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()  # round trip


def test_graph_pass_after_onnx_pass_is_rejected():
    with pytest.raises(ModelpressError, match="after an ONNX-stage pass"):
        Recipe.from_dict({"name": "x", "passes": [{"pass": "quantize.ort-dynamic"}, {"pass": "prune.magnitude"}]})


def test_magnitude_prunes_lowest_norm_units():
    from tests.graph.models_zoo import fresh

    g = fresh("bert")
    grp = g.group("mlp:encoder.layer.0")
    with torch.no_grad():  # make units 3 and 7 tiny: they must be the ones removed
        for u in (3, 7):
            for (p, axis), idx in grp.units[u].items():
                g.state()[p].index_fill_(axis, torch.as_tensor(idx), 1e-6)
    scores = magnitude(g, grp)
    assert set(np.argsort(scores)[:2]) == {3, 7}
    rec = Recipe.from_dict({"name": "t", "passes": [{"pass": "prune.magnitude", "ratios": {"mlp": 0.5, "head": 0.5}}]})
    out = rec.passes[0].apply(g, Context(workdir="/tmp")).graph
    assert g.group("mlp:encoder.layer.0").size == 128  # input graph untouched
    rows = out.summary()["blocks"]
    assert [r["mlp"] for r in rows] == [64, 64] and [r["heads"] for r in rows] == [2, 2]


def test_pipeline_prune_then_int8(tmp_path):
    """Digits CNN from the zoo: prune conv channels, export, ORT dynamic INT8, evaluate and measure."""
    from modelpress.bench import get_target
    from modelpress.data import infer_task, load_data
    from modelpress.graph import ModelGraph
    from modelpress.train.zoo import digits_cnn

    zm = digits_cnn()
    graph = ModelGraph(zm.module, zm.input_spec, {"kind": "factory", "target": "modelpress.train.zoo:digits_cnn_factory"})
    rec = Recipe.from_dict({
        "name": "t",
        "passes": [{"pass": "prune.magnitude", "ratios": {"conv": 0.25}}, {"pass": "quantize.ort-dynamic", "op_types": ["MatMul", "Conv"]}],
        "export": {"optimize": "none"},
    })
    ctx = Context(workdir=tmp_path, task=infer_task(graph.input_spec, graph.module), data=load_data("digits", graph.input_spec),
                  target=get_target("ort-cpu"))
    result = Pipeline(rec).run(graph, ctx, measure=False)
    rep = result.report
    assert rep["after"]["parameters"] < 0.8 * rep["before"]["parameters"]
    assert rep["quality"]["before"]["accuracy"] >= 0.95
    assert rep["quality"]["after"]["accuracy"] >= 0.5  # no recovery training: pruning costs accuracy
    assert result.onnx_path.exists()
