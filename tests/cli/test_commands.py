"""The smaller commands: recipes, inspect, export, bench (tables, JSON and files)."""

from __future__ import annotations

import json

from modelpress.cli import main


def test_recipes_lists_builtins(capsys):
    main(["recipes", "--json"])
    names = {r["name"] for r in json.loads(capsys.readouterr().out)}
    assert {"default", "fp32", "prune-magnitude", "int8-ort-dynamic"} <= names


def test_inspect_default_model(capsys):
    main(["inspect", "--json"])
    s = json.loads(capsys.readouterr().out)
    assert s["embedding_width"] == 384 and len(s["blocks"]) == 6
    assert {(b["heads"], b["head_dim"], b["mlp"]) for b in s["blocks"]} == {(12, 32, 1536)}
    main(["inspect"])
    table = capsys.readouterr().out
    assert "encoder.layer.5" in table and "MACs" in table
    fixed = [g for g in s["groups"] if not g["prunable"]]
    assert fixed and all(g["reason"] for g in fixed)
    assert "fixed groups" in table and fixed[0]["name"] in table


def test_export_and_bench(tmp_path, capsys):
    onnx_path = tmp_path / "cnn.onnx"
    main(["export", "modelpress.train.zoo:digits_cnn_factory", "-o", str(onnx_path), "--optimize", "none", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert onnx_path.exists() and info["max_abs_err"] < 1e-4
    out = tmp_path / "bench.json"
    main(["bench", str(onnx_path), "-o", str(out), "--rounds", "1", "--batch", "1", "-q"])
    data = json.loads(out.read_text())
    shapes = data["variants"]["cnn"]["shapes"]
    assert shapes[0]["batch"] == 1 and shapes[0]["median_ms"] > 0
    assert "cpu_flags" in data["system"]
    assert "median ms" in capsys.readouterr().out
