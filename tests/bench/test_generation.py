"""The generation runner: greedy decoding through the cache with I/O binding gives torch generate's tokens,
the interleaved measurement reports prefill, per-token decode, tokens/s, memory and size, and `modelpress
export` / `bench` handle causal LMs (and refuse what cannot generate) from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from modelpress.bench.generation import OrtDecoder, layout_from_onnx, measure_generation
from modelpress.cli import main
from modelpress.errors import ModelpressError
from modelpress.export.decoder import export_decoder, torch_greedy
from modelpress.targets import cpu_session
from tests.cli.test_errors import assert_clean_error, run_cli
from tests.export.test_decoder import causal_lm

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_decoder(tmp_path_factory):
    model = causal_lm("llama")
    folder = tmp_path_factory.mktemp("llama")
    result = export_decoder(model, folder / "decoder.onnx", two_graphs=True, verify=False)
    return model, result


@pytest.mark.parametrize("form", ["one graph", "two graphs"])
def test_io_bound_generation_gives_the_tokens_of_torch_generate(llama_decoder, form):
    model, result = llama_decoder
    prefill = cpu_session(result.prefill_path) if form == "two graphs" else None
    decoder = OrtDecoder(cpu_session(result.path), result.layout, prefill)
    ids = np.random.default_rng(3).integers(3, 1000, size=(2, 20))
    times: list[float] = []
    got = decoder.generate(ids, None, 32, times)
    np.testing.assert_array_equal(got, torch_greedy(model, ids, np.ones_like(ids), 32))
    assert len(times) == 32 and len(set(got[0].tolist())) > 8
    import onnxruntime as ort

    _, present = decoder.step(decoder.session, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                                "position_ids": np.arange(20)[None].repeat(2, 0),
                                                **result.layout.empty_past(2)})
    assert all(isinstance(p, ort.OrtValue) for p in present)  # the cache stays in ORT's buffers


def test_measure_generation_reports_prefill_decode_memory_and_size(llama_decoder, tmp_path):
    model, result = llama_decoder
    variants = {"onnx": result.path, "two": (result.path, result.prefill_path), "torch": model}
    report = measure_generation(variants, "ort-cpu", prompt_len=16, new_tokens=6, batch_sizes=[1, 2], rounds=1,
                                prefill_runs=1)
    for name in variants:
        for batch in (1, 2):
            s = report.stats(name, batch)
            assert s.prefill_ms > 0 and s.decode_ms > 0 and s.prompt_len == 16
            assert s.tokens_per_s == pytest.approx(batch * 1000.0 / s.decode_ms)
        assert report.variants[name].file_size_bytes > 0
    assert report.stats("onnx", 1).decode_speedup == pytest.approx(1.0)
    assert report.stats("onnx", 2).peak_memory_mb is not None
    assert report.variants["two"].file_size_bytes > report.variants["onnx"].file_size_bytes  # weights twice
    out = report.write_json(tmp_path / "gen.json")
    assert json.loads(out.read_text())["variants"]["torch"]["kind"] == "torch"


def test_a_prompt_longer_than_the_positions_is_refused(llama_decoder):
    model, result = llama_decoder
    with pytest.raises(ModelpressError, match="longer than the model's 128 positions"):
        measure_generation({"onnx": result.path}, prompt_len=120, new_tokens=16, layout=result.layout)
    decoder = OrtDecoder(cpu_session(result.path), result.layout)
    with pytest.raises(ModelpressError, match="positions"):
        decoder.generate(np.zeros((1, 125), np.int64), None, 8)


def test_cli_export_and_bench_a_causal_lm(tmp_path, capsys):
    ckpt = tmp_path / "llama"
    causal_lm("llama").save_pretrained(ckpt)
    from tests.compress.test_lm_pipeline import _tokenizer

    _tokenizer(300).save_pretrained(ckpt)
    out = tmp_path / "out"
    main(["export", str(ckpt), "-o", str(out / "decoder.onnx"), "--json", "-q"])
    info = json.loads(capsys.readouterr().out)
    assert info["verification"]["ok"] and info["verification"]["new_tokens"] == 32
    assert {"decoder.onnx", "genai_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert layout_from_onnx(out / "decoder.onnx").max_positions == 128  # read from genai_config.json

    main(["bench", str(out / "decoder.onnx"), "--prompt", "16", "--new-tokens", "4", "--batch", "1", "--rounds", "1",
          "-o", str(tmp_path / "gen.json"), "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    assert report["prompt_len"] == 16 and report["variants"]["onnx"]["stats"][0]["tokens_per_s"] > 0

    code, err = run_cli(["bench", str(out / "decoder.onnx"), "--prompt", "200", "-q"], capsys)
    assert_clean_error(code, err, "longer than the model's 128 positions")


def test_cli_refuses_generation_for_a_model_without_lm_head(tmp_path, capsys):
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=64)).save_pretrained(bert)
    code, err = run_cli(["bench", str(bert), "--generate", "-o", str(tmp_path / "b.json"), "-q"], capsys)
    assert_clean_error(code, err, "not a causal language model")
    code, err = run_cli(["export", str(bert), "--decoder", "-o", str(tmp_path / "x" / "d.onnx"), "-q"], capsys)
    assert_clean_error(code, err, "not a causal language model")
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "x").exists()


@pytest.mark.usefixtures("short_timing")
def test_compress_writes_the_decoder_and_reports_generation(tmp_path, capsys):
    from modelpress.compress.report import render_markdown

    ckpt = tmp_path / "llama"
    causal_lm("llama").save_pretrained(ckpt)
    ids = np.random.default_rng(0).integers(3, 1000, size=(24, 24))
    np.savez(tmp_path / "ids.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    out = tmp_path / "out"
    main(["compress", str(ckpt), "--recipe", "prune-magnitude", "--data", f"tensors:{tmp_path / 'ids.npz'}",
          "-o", str(out), "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    v = report["decoder"]["compressed"]["verification"]
    assert v["ok"] and v["uncached_tokens_equal"] and v["max_abs_err"] < 1e-4, v
    assert report["decoder"]["genai"]["written"][:2] == ["decoder.onnx", "genai_config.json"]
    gen = report["generation"]["variants"]
    assert set(gen) == {"original", "compressed"}
    assert [s["batch"] for s in gen["compressed"]["stats"]] == [1, 8]  # the ort-cpu target's batch sizes
    md = (out / "report.md").read_text()
    assert "decode tokens/s (batch 1)" in md and "prefill latency (batch 8, prompt 96)" in md
    assert "decode tokens/s (batch 8)" in render_markdown(report)
    pruned = layout_from_onnx(out / "decoder.onnx")
    assert pruned.max_positions == 128 and sum(pruned.kv_heads) <= 4
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(out))  # the folder runs under ONNX Runtime GenAI unchanged
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12, do_sample=False)
    gen_ = og.Generator(model, params)
    gen_.append_tokens(ids[:1, :8])
    gen_.generate_next_token()


def test_a_decoder_with_fewer_layers_is_measured_with_its_own_cache(llama_decoder, tmp_path):
    """A pruned variant (a block removed: fewer cache tensors) is timed beside the original whose layout the
    pipeline passes in."""
    import copy

    model, result = llama_decoder
    short = copy.deepcopy(model)
    short.model.layers = short.model.layers[:-1]
    short.config.num_hidden_layers -= 1
    for i, layer in enumerate(short.model.layers):
        layer.self_attn.layer_idx = i
    pruned = export_decoder(short, tmp_path / "decoder.onnx", verify=False)
    assert len(pruned.layout.past_names) < len(result.layout.past_names)
    report = measure_generation({"original": result.path, "pruned": pruned.path}, "ort-cpu", layout=result.layout,
                                prompt_len=8, new_tokens=3, batch_sizes=[1], rounds=1, prefill_runs=1, memory=False,
                                baseline="original")
    assert report.stats("pruned", 1).decode_ms > 0


def test_layout_of_a_genai_builder_decoder_takes_symbolic_head_sizes_from_its_config(tmp_path):
    """ONNX Runtime GenAI's model builder leaves the cache's head size symbolic ("kv_cache_dim"): the layout reads
    it (and the kv heads, if symbolic) from the genai_config.json beside the graph, so its empty past is valid."""
    import onnx
    from onnx import TensorProto, helper

    def value(name: str, elem: int, dims: list) -> onnx.ValueInfoProto:  # noqa: ANN001
        return helper.make_tensor_value_info(name, elem, dims)

    inputs = [value("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              value("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    outputs = [value("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", 512])]
    nodes = []
    for i in range(2):
        for kind in ("key", "value"):
            inputs.append(value(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                ["batch_size", 2 if i == 0 else "kv_heads", "past_sequence_length", "kv_cache_dim"]))
            outputs.append(value(f"present.{i}.{kind}", TensorProto.FLOAT,
                                 ["batch_size", 2, "total_sequence_length", "kv_cache_dim"]))
            nodes.append(helper.make_node("Identity", [f"past_key_values.{i}.{kind}"], [f"present.{i}.{kind}"]))
    nodes.append(helper.make_node("Identity", ["input_ids"], ["ids_copy"]))
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {
        "context_length": 256, "type": "llama", "eos_token_id": 1, "bos_token_id": 1, "pad_token_id": 1,
        "decoder": {"head_size": 16, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}}}))
    layout = layout_from_onnx(tmp_path / "model.onnx")
    assert layout.head_sizes == [16, 16] and layout.kv_heads == [2, 2] and layout.vocab_size == 512
    assert layout.empty_past(3)["past_key_values.1.value"].shape == (3, 2, 0, 16)
