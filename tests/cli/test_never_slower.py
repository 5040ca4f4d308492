"""The default INT8 never hands back a slower model (issue 19, item 5). On the tiny digits CNN (8x8 images,
a few thousand weights) INT8 lost at batch 1; the default now measures INT8 against float on the target,
keeps float what loses, and says what it decided. This runs the real measurement path; it asserts the
decision follows the measurements it recorded, not a speed."""

from __future__ import annotations

import json

import onnx

from modelpress.cli import main
from modelpress.quantize.speed import SAME_SPEED


def test_default_int8_on_a_tiny_cnn_is_never_slower_than_float(tmp_path, capsys, short_timing, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "int8"
    main(["compress", "modelpress.train.zoo:digits_cnn_factory", "--data", "digits", "-o", str(out), "-q"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # nothing left in the working directory
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    placement = report["export"]["compressed"]["placement"]
    assert placement["placement"] == "onnxruntime-qdq"  # a CNN: ONNX Runtime's conv placement
    assert report["passes"][0]["folded_norms"] >= 1
    guard = placement["speed_guard"]
    first = guard.get("speedups_before", guard.get("speedups"))
    assert set(first) == {"batch 1", "batch 8"}  # measured at the target's shapes
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    if guard["decision"] == "float":
        assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
        assert "float model was handed back" in captured.err
        assert any("INT8 did not pay" in w for w in report["warnings"])
    else:
        assert all(s >= 1.0 - SAME_SPEED for s in guard["speedups"].values()), guard
        assert "QuantizeLinear" in ops
    assert report["quality"]["after"]["agreement"] >= 0.95  # whatever it decided, the model is intact
