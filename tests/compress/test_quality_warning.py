"""A compressed model that drifts far from the original gets a warning and a suggestion in the review."""

from __future__ import annotations

from modelpress.compress.report import review


def test_low_quality_is_reviewed():
    report = {"recipe": {"passes": [{"pass": "prune.magnitude"}]},
              "quality": {"after": {"top1_agreement": 0.5},
                          "warning": "the compressed model drifted far from the original: top1_agreement 0.500"}}
    out = review(report)
    assert any("drifted far" in w for w in out["warnings"])
    assert any("smaller pruning ratios" in s for s in out["suggestions"])
    assert review({"recipe": {"passes": []}, "quality": {"after": {"top1_agreement": 0.99}}})["warnings"] == []


def test_float_fallback_layers_are_listed_in_the_markdown_report():
    from modelpress.compress.report import export_lines

    report = {"export": {"compressed": {"optimization": "qdq", "integer_kernels": 3, "float_fallback": [
        {"layer": "encoder.layer.2.conv_projection", "reason": "its INT8 export disagreed (cosine 0.41)"}]}}}
    text = "\n".join(export_lines(report))
    assert "kept in float: `encoder.layer.2.conv_projection`" in text and "cosine 0.41" in text


def test_a_classifier_whose_agreement_collapses_is_warned(tmp_path):
    """MobileNetV3-Small's old INT8 fell to 0 top-1 agreement without a word: agreement or logit cosine
    below 0.9 is now a warning, in the quality block and in the review, with a suggestion."""
    from types import SimpleNamespace

    from modelpress.compress.pipeline import Pipeline
    from modelpress.compress.recipe import load_recipe
    from modelpress.progress import Reporter

    lines: list[str] = []
    rep = Reporter(quiet=True)
    rep.log = lines.append
    metrics = {"base": {"accuracy": 0.7, "agreement": 1.0, "logit_cosine": 1.0},
               "final": {"accuracy": 0.1, "agreement": 0.0, "logit_cosine": 0.62}}
    ctx = SimpleNamespace(evaluation=[0] * 10, reporter=rep,
                          evaluate=lambda path, **_: SimpleNamespace(metrics=metrics[str(path)]))
    quality = Pipeline(load_recipe("default"))._evaluate(metrics["base"], "final", ctx)["quality"]
    assert "agreement 0.000 (below 0.9)" in quality["warning"] and "logit_cosine 0.620" in quality["warning"]
    assert any("drifted far" in line for line in lines)
    out = review({"recipe": {"passes": [{"pass": "quantize.repq"}]}, "quality": quality})
    assert any("drifted far" in w for w in out["warnings"]) and any("auto_float" in s for s in out["suggestions"])
    metrics["final"] = {"accuracy": 0.7, "agreement": 0.97, "logit_cosine": 0.998}
    assert "warning" not in Pipeline(load_recipe("default"))._evaluate(metrics["base"], "final", ctx)["quality"]


def test_an_original_whose_outputs_are_noise_is_named_as_such():
    """Random-init MobileNetV3's logits are ~1e-10: its own float ONNX export agrees with torch at a logit
    cosine near 0, so "drifted far" would blame the compression for noise."""
    from types import SimpleNamespace

    from modelpress.compress.pipeline import Pipeline
    from modelpress.compress.recipe import load_recipe
    from modelpress.progress import Reporter

    metrics = {"base": {"agreement": 1.0, "logit_cosine": 0.0008}, "final": {"agreement": 0.0, "logit_cosine": 0.0005}}
    ctx = SimpleNamespace(evaluation=[0] * 10, reporter=Reporter(quiet=True),
                          evaluate=lambda path, **_: SimpleNamespace(metrics=metrics[str(path)]))
    quality = Pipeline(load_recipe("default"))._evaluate(metrics["base"], "final", ctx)["quality"]
    assert "rounding noise" in quality["warning"] and "drifted" not in quality["warning"]
    out = review({"recipe": {"passes": [{"pass": "quantize.repq"}]}, "quality": quality})
    assert any("trained weights" in s for s in out["suggestions"])
