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
