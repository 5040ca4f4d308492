"""Bias compensation on bias-less layers: the refit adds a recorded bias, which reloads and is pruned with its layer."""

from __future__ import annotations

import torch

from modelpress.data import load_data
from modelpress.data.tasks import ClassificationTask
from modelpress.graph import ModelGraph
from modelpress.models import load_saved, save
from modelpress.passes import Context, registered_passes


def test_a_bias_added_by_reconstruction_reloads_and_follows_later_edits(zoo_cnn, tmp_path) -> None:  # noqa: ANN001
    source = {"kind": "factory", "target": "modelpress.train.zoo:digits_cnn_factory"}
    graph = ModelGraph(zoo_cnn.module, zoo_cnn.input_spec, source, name="digits-cnn")
    assert graph.module.conv2.bias is None
    data = load_data("digits", graph.input_spec, batch_size=32, n_calibration=96, n_evaluation=64)
    ctx = Context(workdir=tmp_path, task=ClassificationTask(), data=data, reference=graph, seed=0)
    cls = registered_passes()["prune.magnitude"]
    result = cls(cls.Config(ratios={"conv": 0.5}, reconstruct=True)).apply(graph, ctx)
    pruned = result.graph
    layers = result.metrics["reconstruct"]["layers"]
    assert any("bias added" in n for n in layers["conv2"]["notes"])
    assert pruned.module.conv2.bias is not None and pruned.module.conv2.bias.abs().sum() > 0
    assert {"op": "add_bias", "module": "conv2", "size": 32} in pruned.edits
    assert graph.module.conv2.bias is None  # the input graph is untouched
    x = data.evaluation.batches[0]["pixel_values"]
    expected = pruned.forward({"pixel_values": x})
    again = load_saved(save(pruned, tmp_path / "saved"))
    torch.testing.assert_close(again.forward({"pixel_values": x}), expected)
    # the re-discovered groups carry the new bias: removing conv2's outputs slices it too
    group = next(g for g in pruned.groups if g.kind == "conv" and ("conv2.bias", 0) in g.units[0])
    pruned.remove(group, [0, 1])
    assert pruned.module.conv2.bias.shape[0] == pruned.module.conv2.weight.shape[0] == 30
