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
