"""End to end through the CLI on the real pretrained MiniLM: prune 50% MLP + 25% heads, export, measure."""

from __future__ import annotations

import json

import numpy as np
import pytest

import modelpress
from modelpress.cli import main


@pytest.mark.usefixtures("short_timing")
def test_prune_minilm_through_cli(tmp_path, capsys):
    out = tmp_path / "pruned"
    # the built-in recipe as a user's YAML file, its refit on 128 train sentences instead of 512 (test time)
    from importlib.resources import files

    recipe = tmp_path / "prune-magnitude.yaml"
    text = (files("modelpress") / "recipes" / "prune-magnitude.yaml").read_text()
    recipe.write_text(text.replace("    ratios: {mlp: 0.5, head: 0.25}\n",
                                   "    ratios: {mlp: 0.5, head: 0.25}\n    reconstruct_samples: 128\n"))
    assert "reconstruct_samples: 128" in recipe.read_text()
    main(["compress", "--recipe", str(recipe), "-o", str(out), "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    for f in ("model.onnx", "model.safetensors", "modelpress.json", "report.json", "report.md", "tokenizer.json"):
        assert (out / f).exists(), f
    assert not list(tmp_path.glob(".pruned.partial-*"))
    assert report["passes"][0]["reconstruct"]["train_samples"] == 128
    # structure: 50% of MLP units and 25% of heads gone in every block
    assert report["before"]["parameters"] - report["after"]["parameters"] > 4_000_000  # of 10.6M in the encoder
    # latency measured for both, with per-round ratios; fidelity reported on held-out sentences
    variants = report["latency"]["variants"]
    assert set(variants) == {"original", "compressed"}
    shapes = variants["compressed"]["shapes"]
    assert {s["batch"] for s in shapes} == {1, 8}
    assert all(s["median_ms"] > 0 and s["speedup"] > 0 for s in shapes)
    q = report["quality"]["after"]
    assert 0.0 < q["fidelity_mean"] <= 1.0 and "spearman" in q and report["quality"]["samples"] >= 200
    assert report["quality"]["before"]["fidelity_mean"] > 0.9999  # the FP32 export is faithful

    # the output folder reloads (non-uniform widths, no pickle) and agrees with its ONNX file
    g = modelpress.load(out)
    s = g.summary()
    assert [b["heads"] for b in s["blocks"]] == [9] * 6 and [b["mlp"] for b in s["blocks"]] == [768] * 6
    from modelpress.data import onnx_runner, torch_runner

    batch = g.input_spec.make(2, 24, seed=5)
    np.testing.assert_allclose(onnx_runner(out / "model.onnx")(batch), torch_runner(g.module, g.input_spec.names)(batch),
                               atol=2e-3)
    assert "| ORT latency median" in (out / "report.md").read_text()


@pytest.mark.usefixtures("short_timing")
def test_quantize_minilm_through_cli(tmp_path, capsys):
    """`modelpress quantize --method repq --bits w8a8` (the int8 recipe, also the default): every Linear
    INT8 on integer kernels, fidelity on held-out sentences above every peer's (NNCF: 0.9976), and the
    saved fake-quant model reloads to the same outputs as its ONNX file."""
    out = tmp_path / "int8"
    main(["quantize", "--method", "repq", "--bits", "w8a8", "-o", str(out), "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    metrics = report["passes"][0]
    assert set(metrics["layers"].values()) == {"w8a8"}  # nothing kept in float
    assert metrics["channel_sites"]["sites"]  # the scan found Linear inputs worth per-channel scales
    compressed = report["export"]["compressed"]
    assert compressed["kernels"].get("MatMulIntegerToFloat", 0) >= 36, compressed["kernels"]
    assert report["quality"]["after"]["fidelity_mean"] > 0.998, report["quality"]
    assert report["after"]["file_bytes"] < 0.7 * report["before"]["file_bytes"]
    assert all(s["speedup"] > 0 for s in report["latency"]["variants"]["compressed"]["shapes"])

    g = modelpress.load(out)
    from modelpress.data import onnx_runner, torch_runner

    batch = g.input_spec.make(2, 24, seed=5)
    a, b = onnx_runner(out / "model.onnx")(batch), torch_runner(g.module, g.input_spec.names)(batch)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() > 0.99
