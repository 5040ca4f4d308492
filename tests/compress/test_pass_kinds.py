"""Pass kinds: a merge pass takes two graphs in a recipe; recipes order kinds; the Context's services."""

from __future__ import annotations

import pytest
import torch

from modelpress.compress.pipeline import Pipeline
from modelpress.compress.recipe import Recipe
from modelpress.errors import ModelpressError
from modelpress.passes import PASSES, Context, MergePass, PassConfig, PassResult, register


class AverageConfig(PassConfig):
    weight: float = 0.5


class AverageWeights(MergePass):
    """Vanilla averaging of same-architecture models (the fusion baseline): enough to exercise the kind."""

    name = "test.average"
    Config = AverageConfig

    def apply(self, graphs, ctx):  # noqa: ANN001, ANN201
        assert len(graphs) == 2
        out = graphs[0].copy()
        w = self.config.weight
        others = dict(graphs[1].module.named_parameters())
        with torch.no_grad():
            for name, p in out.module.named_parameters():
                p.mul_(w).add_(others[name], alpha=1 - w)
        return PassResult(graph=out, metrics={"models": len(graphs)})


@pytest.fixture(autouse=True)
def _registered():
    register(AverageWeights)
    yield
    PASSES.pop(AverageWeights.name, None)


def _two_vits():
    from tests.graph.models_zoo import fresh

    a = fresh("vit")
    b = fresh("vit")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in b.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return a, b


def test_merge_pass_takes_two_graphs_in_a_recipe(tmp_path):
    a, b = _two_vits()
    recipe = Recipe.from_dict({
        "name": "avg-then-prune",
        "passes": [{"pass": "test.average", "weight": 0.5}, {"pass": "prune.magnitude", "ratios": {"mlp": 0.5}}],
        "export": {"optimize": "none"},
    })
    result = Pipeline(recipe).run([a, b], Context(workdir=tmp_path), measure=False)
    assert [p["stage"] for p in result.report["passes"]] == ["merge", "graph"]
    assert result.report["inputs"] == [a.name, b.name]
    # the merged model is the average before pruning: check a tensor the pruning did not cut
    name = "vit.embeddings.cls_token"
    merged = dict(result.graph.module.named_parameters())[name]
    expected = 0.5 * dict(a.module.named_parameters())[name] + 0.5 * dict(b.module.named_parameters())[name]
    assert torch.allclose(merged, expected)
    assert result.onnx_path.exists() and result.graph.num_parameters() < a.num_parameters()
    # inputs untouched
    assert not torch.equal(dict(a.module.named_parameters())[name], expected)


def test_merge_pass_must_come_first_and_needs_several_models(tmp_path):
    with pytest.raises(ModelpressError, match="merge-stage pass|comes after"):
        Recipe.from_dict({"name": "x", "passes": [{"pass": "prune.magnitude"}, {"pass": "test.average"}]})
    recipe = Recipe.from_dict({"name": "x", "passes": [{"pass": "test.average"}]})
    a, _ = _two_vits()
    with pytest.raises(ModelpressError, match="one model was given"):
        Pipeline(recipe).run(a, Context(workdir=tmp_path), measure=False)
    plain = Recipe.from_dict({"name": "y", "passes": [{"pass": "prune.magnitude"}]})
    with pytest.raises(ModelpressError, match="no merge pass"):
        Pipeline(plain).run(list(_two_vits()), Context(workdir=tmp_path), measure=False)


def test_context_evaluates_and_measures_graphs(tmp_path):
    """The services search and pruning call: export + verify + quality on held-out data, and latency."""
    import numpy as np

    from modelpress.data import infer_task, load_data
    from modelpress.targets import get_target

    a, b = _two_vits()
    images = np.random.default_rng(0).standard_normal((96, *a.input_spec.shape)).astype(np.float32)
    np.savez(tmp_path / "images.npz", pixel_values=images)
    data = load_data(f"tensors:{tmp_path / 'images.npz'}", a.input_spec)
    ctx = Context(workdir=tmp_path, task=infer_task(a.input_spec, a.module), data=data,
                  target=get_target("ort-cpu"), reference=a, seed=3)
    same = ctx.evaluate(a)
    assert same.onnx_path.exists() and same.metrics["agreement"] == 1.0
    other = ctx.evaluate(b)
    assert other.metrics["agreement"] < 1.0
    assert ctx.evaluate(b, torch_only=True).metrics["agreement"] == pytest.approx(other.metrics["agreement"], abs=0.01)
    report = ctx.measure({"a": a, "b": same.onnx_path}, baseline="a", rounds=1, runs=3, min_time_s=0.0,
                         warmup=1, batch_sizes=[1], memory=False)
    assert report.stats("b", 1).median_ms > 0 and report.speedup("b", 1) > 0
    assert ctx.rng("x").random() == Context(workdir=tmp_path, seed=3).rng("x").random()
