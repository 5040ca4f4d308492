"""The latency model (modelpress.bench.latency): round trip, interpolation, prediction, checks, cache, and
one real measurement of a pruned tiny BERT against its prediction (loose: timing in tests is noisy)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from modelpress.bench import latency as L
from modelpress.bench.latency import LatencyTable, build_latency_table, compare_latency, table_key
from modelpress.errors import ModelpressError
from modelpress.targets import get_target
from tests.graph.models_zoo import fresh

GRID = {"heads": [1, 2, 4], "head_dim": [16], "mlp": [32, 64, 128], "embed": [32, 64]}


def _f(h: float, d: float, m: float, e: float) -> float:
    """A multilinear block latency: exact under multilinear interpolation."""
    return 0.05 + 0.01 * h + 0.002 * m + 0.001 * e + 0.0001 * h * e + 0.00002 * m * e + 0.0 * d


@pytest.fixture(scope="module")
def bert():
    return fresh("bert")  # BertModel: 2 layers, 4 heads x 16, MLP 128, hidden 64, 64 positions


@pytest.fixture(scope="module")
def synthetic(bert) -> LatencyTable:
    """A table for the tiny BERT filled from ``_f`` (no timing), rest 0.5 ms at 32 and 1 ms at 64."""
    key = table_key(bert, "ort-cpu", batch=1, seq=64, grid=GRID)
    axes = key["axes"]
    values = [_f(*p) for p in itertools.product(*(axes[a] for a in L.AXES))]
    calibration = [{"embed": e, "rest_ms": e / 64, "scale": 1.0, "full_ms": 0.0, "one_block_ms": 0.0,
                    "block_in_model_ms": 0.0, "block_standalone_ms": 0.0}
                   for e in axes["embed"]]
    return LatencyTable(key=key, versions=L.measurement_versions(), axes=axes, block_ms_grid=values,
                        standalone_ms_grid=values, block_cv=[0.0] * len(values), calibration=calibration)


def test_key_describes_architecture_and_grid(bert):
    key = table_key(bert, "ort-cpu", batch=1, seq=64, grid=GRID)
    arch = key["architecture"]
    assert (arch["model"], arch["block_type"], arch["blocks"]) == ("BertModel", "BertLayer", 2)
    assert (arch["heads"], arch["head_dim"], arch["mlp"], arch["embed"]) == (4, 16, 128, 64)
    assert key["axes"] == {"heads": [1, 2, 4], "head_dim": [16], "mlp": [32, 64, 128], "embed": [32, 64]}
    assert key["seq"] == 64 and key["batch"] == 1 and key["target"]["name"] == "ort-cpu"
    default = table_key(bert, "ort-cpu")["axes"]
    assert default["heads"] == [1, 2, 3, 4] and default["mlp"] == [16, 32, 64, 96, 128]
    assert default["embed"] == [32, 48, 64] and default["head_dim"] == [8, 16]  # head-width groups: half and full


def test_json_round_trip(synthetic, tmp_path):
    path = synthetic.save(tmp_path / "t.json")
    again = LatencyTable.load(path)
    assert again.to_dict() == json.loads(path.read_text())
    assert again.key == synthetic.key and again.axes == synthetic.axes
    assert again.block_ms(3, 16, 100, 50) == pytest.approx(synthetic.block_ms(3, 16, 100, 50))
    bad = json.loads(path.read_text())
    bad["block_ms"] = bad["block_ms"][:-1]
    with pytest.raises(ModelpressError, match="inconsistent"):
        LatencyTable.from_dict(bad)


def test_interpolation_exact_on_grid_and_linear_between(synthetic):
    axes = synthetic.axes
    for h, d, m, e in itertools.product(*(axes[a] for a in L.AXES)):
        assert synthetic.block_ms(h, d, m, e) == pytest.approx(_f(h, d, m, e), rel=1e-12)
    # between grid points (multilinear function: exact), and linear along one axis
    assert synthetic.block_ms(3, 16, 100, 48) == pytest.approx(_f(3, 16, 100, 48), rel=1e-12)
    a, b = synthetic.block_ms(2, 16, 32, 64), synthetic.block_ms(2, 16, 64, 64)
    assert synthetic.block_ms(2, 16, 40, 64) == pytest.approx(a + (b - a) * 8 / 32, rel=1e-12)
    # heads=0 / mlp=0 extrapolate linearly from the smallest points
    assert synthetic.block_ms(0, 16, 0, 64) == pytest.approx(_f(0, 16, 0, 64), rel=1e-12)
    # one-point head-dim axis: head dim 8 with 4 heads costs as 2 heads of 16
    assert synthetic.block_ms(4, 8, 128, 64) == pytest.approx(synthetic.block_ms(2, 16, 128, 64))
    assert synthetic.rest_ms(48) == pytest.approx(0.75)


def test_predict_sums_blocks(synthetic, bert):
    assert synthetic.predict(bert) == pytest.approx(1.0 + 2 * _f(4, 16, 128, 64))
    pruned = bert.copy()
    pruned.remove_many([("head:encoder.layer.0.attention", [2, 3]), ("mlp:encoder.layer.1", list(range(64, 128)))])
    assert synthetic.predict(pruned) == pytest.approx(1.0 + _f(2, 16, 128, 64) + _f(4, 16, 64, 64))
    assert synthetic.predict_widths([(2, 16, 128), {"heads": 4, "mlp": 64}]) == pytest.approx(
        synthetic.predict(pruned))
    pruned.remove_block("encoder.layer.1")
    assert synthetic.predict(pruned) == pytest.approx(1.0 + _f(2, 16, 128, 64))


def test_check_refuses_another_architecture_or_target(synthetic, bert):
    synthetic.check(bert, "ort-cpu", 1, 64)  # its own model and target: fine
    with pytest.raises(ModelpressError, match="not for target edge") as err:
        synthetic.check(bert, "edge", 1, 64)
    assert "modelpress bench --latency-table" in str(err.value) and len(str(err.value)) < 400
    with pytest.raises(ModelpressError, match="batch 8"):
        synthetic.check(bert, "ort-cpu", 8, 64)
    with pytest.raises(ModelpressError, match="sequence 32"):
        synthetic.check(bert, "ort-cpu", 1, 32)
    with pytest.raises(ModelpressError, match="model DistilBertModel"):
        synthetic.check(fresh("distilbert"), "ort-cpu", 1, 64)


def test_cache_hit_does_not_measure(synthetic, bert, tmp_path, monkeypatch):
    calls = []

    def fake(graph, target, key, versions, *args):  # noqa: ANN001, ANN202
        calls.append(key)
        return LatencyTable.from_dict({**synthetic.to_dict(), "key": key, "versions": versions})

    monkeypatch.setattr(L, "_measure_table", fake)
    first = build_latency_table(bert, "ort-cpu", seq=64, grid=GRID, cache_dir=tmp_path)
    again = build_latency_table(bert, "ort-cpu", seq=64, grid=GRID, cache_dir=tmp_path)
    assert len(calls) == 1 and again.to_dict() == first.to_dict()
    assert len(list(tmp_path.glob("BertModel-*.json"))) == 1
    build_latency_table(bert, "ort-cpu", seq=64, grid={**GRID, "heads": [2, 4]}, cache_dir=tmp_path)
    assert len(calls) == 2  # another grid is another table
    for p in tmp_path.glob("BertModel-*.json"):
        d = json.loads(p.read_text())
        d["versions"]["onnxruntime"] = "0.0"
        p.write_text(json.dumps(d))
    build_latency_table(bert, "ort-cpu", seq=64, grid=GRID, cache_dir=tmp_path)
    assert len(calls) == 3 and calls[2] == calls[0]  # other versions: measured again


def test_bad_grid_is_a_short_error(bert):
    with pytest.raises(ModelpressError, match="outside 1..4"):
        table_key(bert, grid={"heads": [2, 8]})
    assert table_key(bert, grid="head_dim=8,16")["axes"]["head_dim"] == [8, 16]  # BERT has head-width groups
    with pytest.raises(ModelpressError, match="no head-dim groups"):
        table_key(fresh("llama"), grid="head_dim=8,16")  # rotary: its heads keep their width
    with pytest.raises(ModelpressError, match="bad grid entry"):
        L.parse_grid("width=3")
    assert L.parse_grid("heads=3,6;mlp=384") == {"heads": [3, 6], "mlp": [384]}


def test_measured_prediction_of_a_pruned_model(tmp_path):
    """Build a real (small) table and compare its prediction for pruned models with a measurement.

    One thread and process CPU time (``clock="cpu"``): on a shared machine wall time at two threads is
    noise (2x swings), while CPU time at one thread predicted these speedups within 10% at a load of 8.
    The 15% goal on wall time belongs to the benchmark, on a quiet machine."""
    import transformers as T

    from modelpress.graph.model_graph import ModelGraph
    from modelpress.models.loaders import hf_input_spec

    torch.manual_seed(0)
    m = T.BertModel(T.BertConfig(vocab_size=500, hidden_size=256, num_hidden_layers=3, num_attention_heads=8,
                                 intermediate_size=1024, max_position_embeddings=128)).eval()
    g = ModelGraph(m, hf_input_spec(m), {"kind": "hf", "class": "BertModel"}, name="bert256")
    target = get_target("ort-cpu", threads=1)
    table = build_latency_table(g, target, batch=1, seq=128, grid={"heads": [2, 8], "head_dim": [32], "mlp": [256, 1024],
                                "embed": [256]}, rounds=3, runs=5, min_time_s=0.05, clock="cpu", cache_dir=tmp_path)
    assert len(table.block_ms_grid) == 4 and all(v > 0 for v in table.block_ms_grid)
    # the level comes from the whole model: the unpruned prediction is its measured latency (medians of
    # per-round differences, so not to the last digit)
    assert table.predict(g) == pytest.approx(table.calibration[0]["full_ms"], rel=0.1)
    uniform = g.copy()
    for i in range(3):
        uniform.remove_many([(f"head:encoder.layer.{i}.attention", list(range(4, 8))),
                             (f"mlp:encoder.layer.{i}", list(range(512, 1024)))])
    mixed = uniform.copy()  # non-uniform: block 0 down to 2 heads, block 2 removed
    mixed.remove_many([("head:encoder.layer.0.attention", [2, 3])])
    mixed.remove_block("encoder.layer.2")
    rows = compare_latency(table, {"full": g, "uniform": uniform, "mixed": mixed}, target, rounds=3,
                           min_time_s=0.2)
    full, uniform_row, mixed_row = rows
    # the table's absolute level: the unpruned model predicted at its latency measured afresh here. Two timing
    # sessions minutes apart: a CI run on a quiet VM measured 4.26 ms against the table's 4.98 (17%); the
    # speedups below, ratios within one session, are what the pruning passes use and stay at 15%
    assert full["predicted_ms"] == pytest.approx(full["measured_ms"], rel=0.25), rows
    for row in (uniform_row, mixed_row):
        assert row["measured_speedup"] > 1.3
        # CPU time at one thread: within 5% at a load of 8 on 2 cores; 15% leaves room for another CPU
        assert abs(row["speedup_error"]) < 0.15, rows
    # the non-uniform model (fewer heads, one block fewer) is predicted and measured faster than the uniform one
    assert mixed_row["predicted_speedup"] > uniform_row["predicted_speedup"] * 1.2
    assert mixed_row["measured_speedup"] > uniform_row["measured_speedup"] * 1.2
    with pytest.raises(ModelpressError, match="cpu clock needs 1 thread"):
        table_key(g, get_target("ort-cpu", threads=2), clock="cpu")


def test_cli_latency_table(synthetic, tmp_path, monkeypatch, capsys):
    """`modelpress bench --latency-table CKPT` builds once (measurement faked here), then reads the cache."""
    from modelpress.cli import main
    from tests.graph.models_zoo import hf_model

    folder = tmp_path / "bert"
    hf_model("bert").save_pretrained(folder)
    calls = []

    def fake(graph, target, key, versions, *args):  # noqa: ANN001, ANN202
        calls.append(key)
        return LatencyTable.from_dict({**synthetic.to_dict(), "key": key, "versions": versions})

    monkeypatch.setattr(L, "_measure_table", fake)
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    args = ["bench", "--latency-table", f"hf:{folder}", "--seq", "64", "--grid", "heads=1,2;mlp=32,64;embed=32"]
    main([*args, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["key"]["axes"]["heads"] == [1, 2, 4] and data["key"]["seq"] == 64
    assert len(list((tmp_path / "cache" / "latency").glob("*.json"))) == 1
    main([*args, "-q"])
    out = capsys.readouterr().out
    assert "block latency, BertModel" in out and "rest" in out and len(calls) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "model.onnx", "--latency-table", f"hf:{folder}"])
    assert exit_.value.code == 2 and "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--threads", "2", "--clock", "cpu"])
    assert "cpu clock needs 1 thread" in capsys.readouterr().err
