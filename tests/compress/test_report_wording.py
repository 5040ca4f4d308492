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


def _classwise_report(speedups: list[float | None]) -> dict[str, Any]:
    """A class-wise run's report: model.onnx is the full model (same size, same speed), the split is in the
    pass's summary; a speedup of None is a device whose latencies were given, not measured."""
    subs = [{"name": f"sub{i}", "classes": [2 * i, 2 * i + 1], "params": 250_000, "params_reduction": 4.0,
             "device": f"d{i}", "latency_ms": 1.0, "full_latency_ms": None if r is None else r,
             "speedup": r} for i, r in enumerate(speedups)]
    split = {"output": "classwise/", "full": {"params": 1_000_000, "latency_ms": {}}, "sub_models": subs,
             "combined": {"metric": "accuracy", "full_model": 0.98, "concat": 0.96, "fusion": 0.97},
             "placement": {"loads_ms": {s["device"]: 1.0 for s in subs}, "makespan_ms": 1.0}}
    report = _report([1.0, 1.0], after_bytes=4 << 20, after_params=2_000_000, recipe="prune.classwise")
    report["passes"] = [{"pass": "prune.classwise", "classwise": split}]
    return report


def test_a_classwise_split_is_compared_with_the_full_model():
    report = _classwise_report([2.5, 0.8, None])
    rows = _changes(report)
    assert rows["sub0 (classes 0, 1) parameters"] == "4.00x smaller"
    assert rows["sub0 (classes 0, 1) latency on d0 (batch 1)"] == "2.50x faster"
    assert rows["sub1 (classes 2, 3) latency on d1 (batch 1)"] == "1.25x slower"
    assert rows["sub2 (classes 4, 5) latency on d2 (batch 1)"] == "given, not measured"
    assert rows["combined accuracy (fusion)"] == "-0.0100" and rows["combined accuracy (concat)"] == "-0.0200"
    assert "same size" not in rows.values() and "same speed" not in rows.values()
    notes = review(report)
    assert notes["warnings"] == ["sub-models measured slower than the full model at batch 1 (sub1 on d1: 1.25x slower)"]
    assert review(_classwise_report([2.5, None])) == {"warnings": [], "suggestions": []}
    markdown = render_markdown({**report, **notes})
    assert "| sub1 | 2, 3 | d1 | 250,000 | 1.000 | 0.800 |" in markdown and "slowest device 1.000 ms" in markdown


def test_slower_at_the_larger_batch_says_where_it_pays_without_asking_for_larger_batches():
    found = review(_report([1.07, 0.6]))
    assert any(s.startswith("it pays at batch 1 (1.07x faster): serve at batch 1") for s in found["suggestions"])
    assert not any("larger batches" in s for s in found["suggestions"])


def test_weight_only_points_at_decoding_not_at_int8_overheads():
    report = _report([0.9, 0.7], recipe="quantize.weight_only")
    report["generation"] = {"variants": {"compressed": {"stats": [{"batch": 1, "decode_speedup": 3.2},
                                                                  {"batch": 8, "decode_speedup": 2.1}]}}}
    text = " ".join(review(report)["suggestions"])
    assert "decode is 3.20x faster at batch 1, 2.10x faster at batch 8" in text
    assert "INT8 savings" not in text and "--recipe fp32" not in text
    del report["generation"]
    assert "for full-sequence speed try --recipe int8" in " ".join(review(report)["suggestions"])
