"""`modelpress compress CKPT --recipe int4-weight-only` on a GPT-2 with a tied LM head: MatMulNBits ONNX, a
packed safetensors file smaller than the input, one tensor for the embedding and the head, and a reload that
agrees with the ONNX file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import modelpress
from modelpress.cli import main
from modelpress.data import onnx_runner, torch_runner

transformers = pytest.importorskip("transformers")


@pytest.mark.usefixtures("short_timing")
def test_compress_int4_weight_only_recipe(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(ckpt)
    ids = np.random.default_rng(0).integers(0, 512, size=(24, 32))
    np.savez(tmp_path / "ids.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    out = tmp_path / "out"
    main(["compress", str(ckpt), "--recipe", "int4-weight-only", "--data", f"tensors:{tmp_path / 'ids.npz'}",
          "-o", str(out), "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    p = report["passes"][0]
    assert p["pass"] == "quantize.weight_only" and p["method"] == "gptq"
    assert p["tied_head"] == {"tied": True, "head": "lm_head", "quantized_once": True}
    assert p["mean_relative_output_error"] < p["mean_relative_output_error_rtn"]
    compressed = report["export"]["compressed"]
    assert compressed["kernels"]["MatMulNBits"] == 9  # 2 blocks x 4 layers + the head
    assert p["layers"]["lm_head"].startswith("w8") and p["layers"]["transformer.h.0.mlp.c_fc"].startswith("w4")
    assert compressed["candidates"]["accuracy_level"]["chosen"] in (0, 4)
    assert report["after"]["parameters"] <= report["before"]["parameters"]
    assert report["quality"]["after"]["top1_agreement"] > 0.8
    assert (out / "model.safetensors").stat().st_size < 0.4 * (ckpt / "model.safetensors").stat().st_size

    g = modelpress.load(out)
    assert g.module.lm_head.qweight is g.module.transformer.wte.qweight
    batch = {"input_ids": np.random.default_rng(3).integers(0, 512, size=(2, 16))}
    batch["attention_mask"] = np.ones_like(batch["input_ids"])
    np.testing.assert_allclose(onnx_runner(out / "model.onnx")(batch), torch_runner(g.module, g.input_spec.names)(batch),
                               atol=2e-2)
