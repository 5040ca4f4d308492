"""The interleaved runner: structure and sanity of its statistics (never speed targets)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from rich.table import Table
from torch import nn

from modelpress.bench import BenchReport, get_target, measure, system_info
from modelpress.errors import ModelpressError
from modelpress.export import export_onnx
from modelpress.graph.inputs import InputSpec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small MLP, exported twice (identical files) plus the torch module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    spec = InputSpec("tensor", ["x"], shape=(32,))
    folder = tmp_path_factory.mktemp("runner")
    a = folder / "a.onnx"
    export_onnx(model, spec, a, optimize="none")
    b = folder / "b.onnx"
    shutil.copy(a, b)
    return model, spec, a, b


def test_measure_two_variants_and_torch(tiny, tmp_path):
    model, spec, a, b = tiny
    target = get_target("ort-cpu", threads=1)
    model.train()  # measured in eval mode, handed back in the mode it came in
    report = measure(
        {"a": a, "b": b, "torch": model},
        spec,
        target,
        rounds=3,
        runs=5,
        min_time_s=0.0,
        batch_sizes=[1, 4],
    )
    assert model.training
    model.eval()
    assert isinstance(report, BenchReport)
    assert report.baseline == "a" and report.rounds == 3
    assert list(report.variants) == ["a", "b", "torch"]
    for name, variant in report.variants.items():
        assert variant.kind == ("torch" if name == "torch" else "onnx")
        assert variant.file_size_bytes > 0
        assert [(s.batch, s.seq_len) for s in variant.shapes] == [(1, None), (4, None)]
        for s in variant.shapes:
            assert s.median_ms > 0
            assert s.p99_ms >= s.median_ms
            assert s.cv >= 0
            assert s.runs >= 15 and len(s.round_medians_ms) == 3
            assert s.throughput == pytest.approx(s.batch * 1000 / s.median_ms)
            assert s.peak_memory_mb is not None and s.peak_memory_mb > 0
            assert len(s.speedup_rounds) == 3
    assert report.speedup("a", 1) == pytest.approx(1.0)
    # The same file measured twice: a ratio near 1 (loose: this machine is shared and noisy).
    assert 0.3 < report.speedup("b", 4) < 3.0
    assert report.variants["a"].memory_error is None

    data = json.loads(report.to_json())
    assert data["variants"]["b"]["shapes"][0]["batch"] == 1
    assert "cpu_flags" in data["system"] and data["target"]["threads"] == 1
    table = report.to_table()
    assert isinstance(table, Table) and table.row_count == 6
    out = report.write_json(tmp_path / "sub" / "report.json")
    assert json.loads(out.read_text())["baseline"] == "a"
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.json"]


def test_text_inputs_use_sequence_lengths(tiny_bert_onnx):
    path, spec = tiny_bert_onnx
    report = measure(
        {"bert": path}, spec, "edge", rounds=1, runs=2, min_time_s=0.0, seq_lens=[8, 16], memory=False
    )
    shapes = [(s.batch, s.seq_len) for s in report.variants["bert"].shapes]
    assert shapes == [(1, 8), (1, 16)]
    assert report.stats("bert", 1, 16).median_ms > 0
    assert report.variants["bert"].shapes[0].peak_memory_mb is None


@pytest.fixture(scope="module")
def tiny_bert_onnx(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=1100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    spec = InputSpec("text", ["input_ids", "attention_mask"], vocab_size=1100, default_seq_len=16)
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    export_onnx(transformers.BertModel(config).eval(), spec, path, optimize="none")
    return path, spec


def test_measure_errors(tiny, tmp_path):
    model, spec, a, _ = tiny
    with pytest.raises(ModelpressError, match="no ONNX file"):
        measure({"missing": tmp_path / "nope.onnx"}, spec, "edge")
    with pytest.raises(ModelpressError, match="baseline"):
        measure({"a": a}, spec, "edge", baseline="b")
    with pytest.raises(ModelpressError, match="nothing to measure"):
        measure({}, spec, "edge")
    with pytest.raises(ModelpressError, match="unknown target"):
        measure({"a": a}, spec, "nowhere")


def test_system_info_has_cpu_flags_and_versions():
    info = system_info(threads=2)
    assert info["cpu_model"]
    assert isinstance(info["cpu_flags"], list)
    assert info["threads"] == 2 and info["cores_available"] >= 1
    for lib in ("torch", "onnxruntime", "onnx", "transformers"):
        assert info["versions"][lib]
    assert "CPUExecutionProvider" in info["ort_providers"]
    assert isinstance(info["vnni"], bool)


def test_inputs_the_model_does_not_take_are_left_out(tiny_bert_onnx):
    path, _ = tiny_bert_onnx  # exported with input_ids and attention_mask only
    spec = InputSpec("text", ["input_ids", "attention_mask", "token_type_ids"], vocab_size=1100)
    report = measure({"bert": path}, spec, "edge", rounds=1, runs=2, min_time_s=0.0, seq_lens=[8])
    stats = report.stats("bert", 1)
    assert stats.median_ms > 0 and stats.peak_memory_mb is not None
    assert report.variants["bert"].memory_error is None


def test_sequence_lengths_are_capped_at_the_model_positions(tmp_path):
    """A target measuring at 128 tokens must not crash a model with a 32-position table: it runs at 32."""
    import transformers

    from modelpress.models.loaders import hf_input_spec

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    spec = hf_input_spec(model)
    assert spec.max_seq_len == 32 and spec.default_seq_len == 32
    assert InputSpec.from_dict(spec.to_dict()).max_seq_len == 32
    path = tmp_path / "short.onnx"
    export_onnx(model, spec, path, optimize="none")
    report = measure({"m": path}, spec, get_target("ort-cpu", threads=1), rounds=1, runs=2, min_time_s=0.0,
                     batch_sizes=[1], seq_lens=[16, 128], memory=False)
    assert [(s.batch, s.seq_len) for s in report.variants["m"].shapes] == [(1, 16), (1, 32)]
