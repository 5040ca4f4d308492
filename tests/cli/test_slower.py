"""On a model where INT8 does not pay (the tiny digits CNN: 8x8 images, a few thousand weights, INT8
measured 0.31x), `modelpress compress` says "x slower", warns on stderr and suggests what to try, in
the printed table, report.json and report.md."""

from __future__ import annotations

import json

from modelpress.cli import main


def test_int8_on_a_tiny_cnn_is_reported_as_slower(tmp_path, capsys):
    out = tmp_path / "int8"
    main(["compress", "modelpress.train.zoo:digits_cnn_factory", "-r", "int8", "--data", "digits", "-o", str(out), "-q"])
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    shapes = report["latency"]["variants"]["compressed"]["shapes"]
    assert all(s["speedup"] < 1.0 for s in shapes), shapes  # the premise: INT8 loses on this model

    latency_lines = [line for line in captured.out.splitlines() if "ORT latency median" in line]
    assert latency_lines and all("x slower" in line and "faster" not in line for line in latency_lines), captured.out
    assert "warning: the compressed model is slower than the original" in captured.err
    assert "-> try:" in captured.err and "--recipe fp32" in captured.err

    assert any("slower than the original" in w for w in report["warnings"])
    assert any("--recipe fp32" in s for s in report["suggestions"])
    md = (out / "report.md").read_text()
    assert "x slower |" in md and "**Warning**: the compressed model is slower" in md and "- Try: " in md
