"""The before/after table says what happened in words: "1.32x slower", never "0.76x faster"; a file that
grew reads "larger"; warnings and suggestions appear when the result does not pay."""

from __future__ import annotations

from typing import Any

from modelpress.compress.report import comparison_rows, render_markdown, review


def _report(speedups: list[float], before_bytes: int = 4 << 20, after_bytes: int = 1 << 20,
            before_params: int = 2_000_000, after_params: int = 1_000_000, recipe: str = "quantize.repq") -> dict[str, Any]:
    base = [{"batch": b, "seq_len": None, "median_ms": 10.0} for b in (1, 8)[: len(speedups)]]
    comp = [{"batch": s["batch"], "seq_len": None, "median_ms": 10.0 / r, "speedup": r} for s, r in zip(base, speedups, strict=True)]
    return {
        "model": "m",
        "recipe": {"name": "r", "passes": [{"pass": recipe}]},
        "before": {"parameters": before_params, "file_bytes": before_bytes},
        "after": {"parameters": after_params, "file_bytes": after_bytes},
        "latency": {"target": {"name": "ort-cpu"},
                    "variants": {"original": {"shapes": base}, "compressed": {"shapes": comp}}},
    }


def _changes(report: dict[str, Any]) -> dict[str, str]:
    return {metric: change for metric, _, _, change in comparison_rows(report)}


def test_faster_and_smaller():
    rows = _changes(_report([1.25, 2.0]))
    assert rows["ORT latency median (batch 1)"] == "1.25x faster"
    assert rows["ORT latency median (batch 8)"] == "2.00x faster"
    assert rows["ONNX file"] == "4.00x smaller" and rows["parameters"] == "2.00x smaller"
    assert review(_report([1.25, 2.0])) == {"warnings": [], "suggestions": []}


def test_slower_is_said_as_slower_with_a_warning_and_suggestions():
    report = _report([0.76, 0.5])
    rows = _changes(report)
    assert rows["ORT latency median (batch 1)"] == "1.32x slower"  # not "0.76x faster"
    assert rows["ORT latency median (batch 8)"] == "2.00x slower"
    found = review(report)
    assert len(found["warnings"]) == 1 and "slower than the original on ort-cpu at every measured shape" in found["warnings"][0]
    text = " ".join(found["suggestions"])
    assert "--recipe fp32" in text and "--recipe prune-magnitude" in text and "--target edge" in text


def test_slower_at_one_batch_only_suggests_the_batch_where_it_pays():
    found = review(_report([0.8, 1.5]))
    assert "at some shapes (batch 1: 1.25x slower)" in found["warnings"][0]
    assert any("it pays at batch 8 (1.50x faster)" in s for s in found["suggestions"])


def test_larger_file_is_said_as_larger_with_a_warning():
    report = _report([1.1], before_bytes=1_000_000, after_bytes=1_200_000, before_params=1000, after_params=1000)
    rows = _changes(report)
    assert rows["ONNX file"] == "1.20x larger"
    assert rows["parameters"] == "same size"
    found = review(report)
    assert found["warnings"] == ["the compressed ONNX file is 1.20x larger than the original"]
    assert "--recipe fp32" in found["suggestions"][0]


def test_equal_speed_and_size_read_as_same():
    report = _report([1.001], before_bytes=1000, after_bytes=1000)
    rows = _changes(report)
    assert rows["ORT latency median (batch 1)"] == "same speed" and rows["ONNX file"] == "same size"
    assert review(report)["warnings"] == []


def test_report_md_carries_warnings_and_suggestions():
    report = _report([0.5, 0.5])
    report.update(review(report))
    md = render_markdown(report)
    assert "| ORT latency median (batch 1) | 10.00 ms | 20.00 ms | 2.00x slower |" in md
    assert "## Warnings" in md and "- **Warning**: the compressed model is slower" in md
    assert "- Try: " in md and "--recipe fp32" in md
