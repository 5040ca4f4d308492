"""RepQ W8A8 through the pipeline on the digits ViT: QDQ export with integer kernels, accuracy kept on
this CPU, and the quantized torch model saves and reloads exactly."""

from __future__ import annotations

import torch

from modelpress.compress import Context, Pipeline, Recipe
from modelpress.data import ClassificationTask, load_data, onnx_runner, torch_runner
from modelpress.graph import ModelGraph
from modelpress.models import load_saved, save
from modelpress.train.zoo import digits_vit


def test_repq_digits_vit_end_to_end(tmp_path):
    zm = digits_vit()
    graph = ModelGraph(zm.module, zm.input_spec, {"kind": "hf", "class": "ViTForImageClassification",
                                                   "config": zm.module.config.to_dict()}, name="digits-vit")
    data = load_data("digits", graph.input_spec, n_calibration=64, n_evaluation=None)
    rec = Recipe.from_dict({"name": "t", "passes": [{"pass": "quantize.repq", "samples": 64}], "export": {"optimize": "none"}})
    ctx = Context(workdir=tmp_path / "work", task=ClassificationTask(), data=data)
    result = Pipeline(rec).run(graph, ctx, measure=False)
    rep = result.report
    fp32, int8 = rep["quality"]["before"]["accuracy"], rep["quality"]["after"]["accuracy"]
    assert fp32 >= 0.95
    assert int8 >= fp32 - 0.02, (fp32, int8)  # the exported INT8 model, run by ONNX Runtime on this CPU
    info = rep["export"]["compressed"]
    assert info["integer_kernels"] > 0, info.get("kernels")
    assert info["verification"]["min_cosine"] > 0.99

    save(result.graph, tmp_path / "saved")
    again = load_saved(tmp_path / "saved")
    x = data.evaluation.batches[0]["pixel_values"]
    torch.testing.assert_close(again.forward({"pixel_values": x}), result.graph.forward({"pixel_values": x}))
    acc = ClassificationTask().evaluate(onnx_runner(result.onnx_path), None, data.evaluation)["accuracy"]
    assert acc == int8
    assert ClassificationTask().evaluate(torch_runner(again.module, ["pixel_values"]), None, data.evaluation)["accuracy"] >= fp32 - 0.02


def test_log2_attention_export_form_and_cost_are_reported(tmp_path):
    """With quantized attention (log-sqrt2 probabilities, reparameterized to log2), the pipeline exports
    the form ONNX Runtime can run, says which, and evaluates the torch simulation beside it."""
    from modelpress.compress.report import render_markdown

    zm = digits_vit()
    graph = ModelGraph(zm.module, zm.input_spec, name="digits-vit")
    data = load_data("digits", graph.input_spec, n_calibration=32, n_evaluation=None)
    rec = Recipe.from_dict({"name": "t", "passes": [{"pass": "quantize.repq", "samples": 32, "attention": True,
                                                     "reconstruction": "none"}],
                            "export": {"optimize": "none"}})
    ctx = Context(workdir=tmp_path / "work", task=ClassificationTask(), data=data)
    rep = Pipeline(rec).run(graph, ctx, measure=False).report
    log = rep["export"]["compressed"]["log_export"]
    assert log["quantizers"] == zm.module.config.num_hidden_layers and log["form"] in ("uniform", "simulate")
    assert log["checks"][log["form"]]["min_cosine"] > 0.99
    sim, after = rep["quality"]["torch_simulation"]["accuracy"], rep["quality"]["after"]["accuracy"]
    assert after >= sim - 0.02, (sim, after)
    md = render_markdown(rep)
    assert f"exported as `{log['form']}`" in md and "torch simulation ->" in md
