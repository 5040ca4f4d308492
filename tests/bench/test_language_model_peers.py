"""The language-model benchmark's peers (benchmarks/language_model.py --llama): NNCF's INT4 (AWQ + scale
estimation, ONNX backend) on our fused FP32 cached decoder gives a MatMulNBits decoder ONNX Runtime runs through
its cache and that verifies; llama.cpp is skipped with its reason where its converter is not at hand."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from modelpress.export.decoder import export_decoder
from tests.bench.scripts import load_benchmark
from tests.export.test_decoder import causal_lm

pytest.importorskip("transformers")


def test_nncf_int4_decoder_is_matmulnbits_and_verifies(tmp_path):
    pytest.importorskip("nncf")
    bench = load_benchmark("language_model")
    model = causal_lm("llama")  # grouped-query attention, rotary, tied head: the fused graph
    fp32 = export_decoder(model, tmp_path / "fp32" / "decoder.onnx", new_tokens=8)
    assert fp32.attention["form"].startswith("fused")
    rows = torch.from_numpy(np.random.default_rng(0).integers(3, 1000, size=(4, 32)))
    path, extra = bench._nncf_int4_decoder(fp32.path, tmp_path / "nncf" / "decoder.onnx", rows)
    graph = onnx.load(str(path))
    ops = Counter(n.op_type for n in graph.graph.node)
    # the 14 projections (q, k, v, o, gate, up, down per layer) in 4 bits; the tied head stays NNCF's INT8 backup
    assert ops["MatMulNBits"] == 14 and ops["GroupQueryAttention"] == 2, ops
    levels = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {4}
    assert extra["config"]["awq"] and extra["config"]["scale_estimation"]
    check = bench._quantized_verification(path, model, 8)
    assert check["cache_tokens_equal_uncached"] and check["cache_logits_max_abs_err"] < 0.05, check
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 1000, size=(2, 24)))
    with torch.inference_mode():
        ref = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1).numpy()
    quality = bench._decoder_quality(path, ids, ref)
    # random weights (initializer_range 0.2) lose much in 4 bits: ONNX Runtime's RTN of the same decoder is the bar
    # (KL 0.21 here; NNCF 0.24; zero points left unpacked would not even load, swapped nibbles give 1.9)
    rtn = bench._decoder_quality(bench._ort_rtn_decoder(fp32.path, tmp_path / "rtn" / "decoder.onnx"), ids, ref)
    assert 0 < quality["next_token_kl"] < 1.5 * rtn["next_token_kl"], (quality, rtn)
    assert sorted(p.name for p in path.parent.iterdir()) == ["decoder.onnx"]  # no folded/temporary files left


def test_llama_cpp_without_its_converter_is_skipped_with_the_reason(tmp_path):
    bench = load_benchmark("language_model")
    with pytest.raises(bench._Skip, match="llama-cpp-python is not installed|--llama-cpp-src"):
        bench._llama_cpp_build(tmp_path / "hf", tmp_path / "out" / "model.gguf", None)
    with pytest.raises(bench._Skip, match="llama-cpp-python is not installed|--llama-cpp-src"):
        bench._llama_cpp_build(tmp_path / "hf", tmp_path / "out" / "model.gguf", tmp_path)
    assert not (tmp_path / "out").exists()
