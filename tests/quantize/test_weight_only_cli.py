"""`modelpress compress CKPT --recipe int4-weight-only` on a GPT-2 with a tied LM head: MatMulNBits ONNX, a
packed safetensors file smaller than the input, one tensor for the embedding and the head, a reload that
agrees with the ONNX file, and the INT4 cached decoder with its genai_config running under ONNX Runtime GenAI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import modelpress
from modelpress.bench.generation import layout_from_onnx
from modelpress.cli import main
from modelpress.data import onnx_runner, torch_runner
from modelpress.export.decoder import greedy_onnx
from modelpress.targets import cpu_session

transformers = pytest.importorskip("transformers")


@pytest.mark.usefixtures("short_timing")
def test_compress_int4_weight_only_recipe(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)  # GenAI needs an end-of-text token in the vocabulary
    transformers.GPT2LMHeadModel(cfg).save_pretrained(ckpt)
    ids = np.random.default_rng(0).integers(0, 512, size=(24, 32))
    np.savez(tmp_path / "ids.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    out = tmp_path / "out"
    main(["compress", str(ckpt), "--recipe", "int4-weight-only", "--data", f"tensors:{tmp_path / 'ids.npz'}",
          "-o", str(out), "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    p = report["passes"][0]
    assert p["pass"] == "quantize.weight_only" and p["method"] == "gptq"
    tied = p["tied_head"]
    assert {k: tied[k] for k in ("tied", "head", "quantized_once")} == {"tied": True, "head": "lm_head",
                                                                        "quantized_once": True}
    assert tied["objective"].startswith("head inputs + embedding look-ups") and tied["rows_looked_up"] > 0
    assert p["mean_relative_output_error"] < p["mean_relative_output_error_rtn"]
    compressed = report["export"]["compressed"]
    assert compressed["kernels"]["MatMulNBits"] == 9  # 2 blocks x 4 layers + the head
    assert p["layers"]["lm_head"].startswith("w4") and p["layers"]["transformer.h.0.mlp.c_fc"].startswith("w4")
    assert compressed["candidates"]["accuracy_level"]["chosen"] in (0, 4)
    # every weight is still there, as packed codes (the tied pair once): the same count, not the buffers' zero
    assert report["after"]["parameters"] == report["before"]["parameters"]
    assert report["quality"]["after"]["top1_agreement"] > 0.8
    assert (out / "model.safetensors").stat().st_size < 0.4 * (ckpt / "model.safetensors").stat().st_size

    g = modelpress.load(out)
    assert g.module.lm_head.qweight is g.module.transformer.wte.qweight
    batch = {"input_ids": np.random.default_rng(3).integers(0, 512, size=(2, 16))}
    batch["attention_mask"] = np.ones_like(batch["input_ids"])
    np.testing.assert_allclose(onnx_runner(out / "model.onnx")(batch), torch_runner(g.module, g.input_spec.names)(batch),
                               atol=2e-2)

    # the cached decoder is the INT4 one (MatMulNBits), verified against the quantized torch model, in a folder
    # ONNX Runtime GenAI runs: its greedy tokens are those of our own ONNX Runtime loop on the same file
    dec = report["decoder"]["compressed"]
    assert dec["verification"]["ok"] and dec["form"].endswith("weight-only MatMulNBits"), dec
    assert report["decoder"]["genai"].get("written", [])[:2] == ["decoder.onnx", "genai_config.json"], report["decoder"]
    ops = [n.op_type for n in onnx.load(str(out / "decoder.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 9
    og = pytest.importorskip("onnxruntime_genai")
    prompt = np.random.default_rng(5).integers(3, 512, size=(1, 10)).astype(np.int64)
    layout = layout_from_onnx(out / "decoder.onnx")
    want = greedy_onnx(cpu_session(out / "decoder.onnx"), layout, prompt, np.ones_like(prompt), 16)[0][0].tolist()
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=10 + 16, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    assert tokens == want[: len(tokens)] and len(tokens) >= 4

    # `modelpress export` of the saved INT4 folder lowers its packed layers into the decoder the same way
    capsys.readouterr()
    main(["export", str(out), "-o", str(tmp_path / "again" / "decoder.onnx"), "--json", "-q"])
    again = json.loads(capsys.readouterr().out)
    assert again["verification"]["ok"] and again["lowering"]["name"] == "weight-only MatMulNBits"
    assert [n.op_type for n in onnx.load(str(tmp_path / "again" / "decoder.onnx")).graph.node].count("MatMulNBits") == 9

    # `modelpress bench` of the saved INT4 folder times generation through the same lowered decoder
    capsys.readouterr()
    bench_json = tmp_path / "bench.json"
    main(["bench", str(out), "--rounds", "1", "--new-tokens", "4", "--prompt", "8", "-o", str(bench_json), "--json", "-q"])
    timed = json.loads(bench_json.read_text())["variants"]["onnx"]
    assert timed["file_size_bytes"] == (out / "decoder.onnx").stat().st_size  # the lowered file (float: 2x larger)
