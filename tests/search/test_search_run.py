"""A whole search on the digits ViT: quality, predicted latency (latency model extended to precision) and
size over widths, skipped blocks and an INT8/float gene per Linear; outputs, extraction, resume, bad input,
and the Ray executor on a local Ray runtime."""

from __future__ import annotations

import json

import pytest
import torch

from modelpress.errors import ModelpressError
from tests.search.conftest import DATA

pytest.importorskip("pymoo")

OBJ = ["quality", "latency", "size"]


def _ctx(graph, data, tmp_path):  # noqa: ANN001, ANN202
    from modelpress.bench import get_target
    from modelpress.data.tasks import ClassificationTask
    from modelpress.passes import Context

    return Context(workdir=tmp_path / "w", task=ClassificationTask(), data=data, reference=graph,
                   target=get_target("ort-cpu", threads=1), seed=0)


SPACE = {"head_fractions": (0.5, 1.0), "mlp_fractions": (0.25, 0.5, 1.0)}


def _search(graph, data, table, tmp_path, run, **kw):  # noqa: ANN001, ANN202
    from modelpress.search.run import run_search

    torch.set_num_threads(1)
    opts = dict(objectives=OBJ, budget=4, batch_size=2, data_spec=DATA, latency_table=table, generations=6,
                pop_size=12, uniform=(0.5,), int8_factor=0.7, space_options=SPACE)
    opts.update(kw)
    return run_search(graph, _ctx(graph, data, tmp_path), tmp_path / run, **opts)


@pytest.fixture(scope="module")
def searched(vit_graph, vit_data, vit_table, tmp_path_factory):  # noqa: ANN001, ANN201
    """One uninterrupted search (two batches) and one stopped after its first batch, shared by the tests."""
    tmp = tmp_path_factory.mktemp("search")
    full = _search(vit_graph, vit_data, vit_table, tmp, "full")
    part = _search(vit_graph, vit_data, vit_table, tmp, "part", max_batches=1)
    return tmp, full, part


def test_search_outputs(searched, vit_graph) -> None:  # noqa: ANN001
    tmp, full, part = searched
    assert full["evaluated"] == 4 and full["pareto"] and full["hypervolume"] > 0
    assert part["evaluated"] == 2
    base = full["baselines"]["points"]
    assert {"full-float", "full-int8", "smallest-int8", "uniform-0.5-int8"} <= set(base)
    assert base["full-float"]["objectives"]["quality"] > 0.9
    assert base["full-int8"]["objectives"]["size"] < 0.5 * base["full-float"]["objectives"]["size"]
    for name in ("pareto.csv", "pareto.json", "state.json", "search.json"):
        assert (tmp / "full" / name).is_file()
    assert full["batches"][1]["predictors"]["quality"]["model"] in ("ridge", "svr", "gbm")
    assert all(p["predicted"] is not None or p["batch"] == 0 for p in full["pareto"])
    # the first batch measures the anchors first (full float, then full INT8), reusing their baseline values
    first = [r for r in json.loads((tmp / "full" / "state.json").read_text())["records"] if r["batch"] == 0]
    assert [r["config"] for r in first] == [base["full-float"]["config"], base["full-int8"]["config"]]
    assert [r["objectives"] for r in first] == [base[n]["objectives"] for n in ("full-float", "full-int8")]


def test_extract_a_point(searched, vit_graph) -> None:  # noqa: ANN001
    from modelpress.models.saving import load_saved
    from modelpress.search.outputs import extract

    tmp, full, _ = searched
    # extraction of the most accurate point: a standalone model with its ONNX, as evaluated
    best = max(range(len(full["pareto"])), key=lambda k: full["pareto"][k]["objectives"]["quality"])
    out = extract(tmp / "full", tmp / "chosen", point=best)
    assert (tmp / "chosen" / "model.onnx").is_file()
    reloaded = load_saved(tmp / "chosen")
    assert reloaded.num_parameters() <= vit_graph.num_parameters()
    assert out["point"]["point"] == best
    with pytest.raises(ModelpressError, match="no point"):
        extract(tmp / "full", tmp / "none", min_quality=1.5)


def test_precision_genes_keep_reparameterization_where_a_norms_readers_agree(searched) -> None:  # noqa: ANN001
    """One precision gene per Linear may split the readers of one LayerNorm (one of q/k/v float, the others
    INT8): that norm keeps per-tensor input scales, every other norm is reparameterized (its readers share
    one quantizer), and the mixed model still scores close to full INT8."""
    from modelpress.search.workers import load_evaluator

    tmp, _, _ = searched
    ev = load_evaluator(tmp / "full")
    shared = [consumers for _norm, consumers, *_ in ev.net.graph.norm_consumers() if len(consumers) > 1]
    split, whole = shared[1], shared[0]
    config = ev.net.space.largest("int8")
    config["precision"][split[0]] = "float"
    graph, _ = ev.build(config)  # the full widths: module names as in the super-network
    modules = dict(graph.module.named_modules())
    quantizers = [getattr(modules[n], "input_quantizer", None) for n in split]
    assert quantizers[0] is None and all(q is not None for q in quantizers[1:])
    assert len({id(q) for q in quantizers[1:]}) == len(split) - 1  # each its own per-tensor quantizer
    assert len({id(modules[n].input_quantizer) for n in whole}) == 1  # one reparameterized quantizer
    mixed, _ = ev.quality(config)
    full_int8, _ = ev.quality(ev.net.space.largest("int8"))
    assert mixed >= full_int8 - 0.03, (mixed, full_int8)


def test_interrupted_search_resumes_to_the_same_result(searched, vit_graph, vit_data, vit_table) -> None:  # noqa: ANN001
    tmp, full, _ = searched
    with pytest.raises(ModelpressError, match="already holds"):
        _search(vit_graph, vit_data, vit_table, tmp, "part")
    # a run folder of another space is refused, and left as it was
    before = (tmp / "part" / "state.json").read_text()
    with pytest.raises(ModelpressError, match="another model or space"):
        _search(vit_graph, vit_data, vit_table, tmp, "part", resume=True, space_options={"mlp_fractions": (0.5, 1.0)})
    assert (tmp / "part" / "state.json").read_text() == before
    # resumed: the same candidates and values as the uninterrupted run
    resumed = _search(vit_graph, vit_data, vit_table, tmp, "part", resume=True)
    a = json.loads((tmp / "full" / "state.json").read_text())["records"]
    b = json.loads((tmp / "part" / "state.json").read_text())["records"]
    assert [r["config"] for r in a] == [r["config"] for r in b]
    assert [r["objectives"] for r in a] == [r["objectives"] for r in b]
    assert resumed["hypervolume"] == pytest.approx(full["hypervolume"])


def test_bad_input_is_a_short_error(vit_graph, vit_data, vit_table, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ModelpressError, match="unknown objective 'speed'"):
        _search(vit_graph, vit_data, vit_table, tmp_path, "a", objectives=["quality", "speed"])
    with pytest.raises(ModelpressError, match="smaller than one batch"):
        _search(vit_graph, vit_data, vit_table, tmp_path, "b", budget=2, batch_size=4, objectives=["quality", "size"])
    assert not (tmp_path / "b").exists()  # refused before any work
    with pytest.raises(ModelpressError, match="latency batch 4 does not fit the latency table's batch 1"):
        _search(vit_graph, vit_data, vit_table, tmp_path, "d", latency_batch=4)
    with pytest.raises(ModelpressError, match="empty"):
        _search(vit_graph, vit_data, vit_table, tmp_path, "c", objectives=["quality", "size"],
                space_options={"head_fractions": (1.0,), "mlp_fractions": (1.0,), "skip_blocks": False,
                               "precisions": ("float",)})


def test_ray_executor_runs_a_small_search(vit_graph, vit_data, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    pytest.importorskip("ray", reason="the Ray executor needs the ray extra")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    small = dict(objectives=["quality", "size"], budget=4, batch_size=2, uniform=(),
                 space_options={**SPACE, "precisions": ("float",)})
    result = _search(vit_graph, vit_data, None, tmp_path, "ray", executor="ray", workers=1, **small)
    assert result["evaluated"] == 4 and result["pareto"]
    serial = _search(vit_graph, vit_data, None, tmp_path, "serial", **small)
    assert [p["objectives"] for p in result["pareto"]] == [p["objectives"] for p in serial["pareto"]]
