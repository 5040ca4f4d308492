"""A whole search on the digits ViT: quality, predicted latency (latency model extended to precision) and
size over widths, skipped blocks and an INT8/float gene per Linear; outputs, extraction, resume, bad input;
the predictors on held-out evaluations; measured latency, locally and through the Ray executor (its target
measurement) on a local Ray runtime."""

from __future__ import annotations

import json
import os

import numpy as np
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
    # candidates after the first batch carry the prediction made before they were measured (quality: the one
    # expensive objective here; latency and size are computed), the first batch none
    state = json.loads((tmp / "full" / "state.json").read_text())
    assert all((r["predicted"] is None) == (r["batch"] == 0) for r in state["records"])
    assert all(set(r["predicted"]) == {"quality"} for r in state["records"] if r["batch"])
    # the first batch measures the anchors first (full float, then full INT8), reusing their baseline values
    first = [r for r in json.loads((tmp / "full" / "state.json").read_text())["records"] if r["batch"] == 0]
    assert [r["config"] for r in first] == [base["full-float"]["config"], base["full-int8"]["config"]]
    assert [r["objectives"] for r in first] == [base[n]["objectives"] for n in ("full-float", "full-int8")]


def test_extract_a_point(searched, capsys) -> None:  # noqa: ANN001
    """`modelpress search extract RUN_DIR --point N -o OUT` (no checkpoint argument): a standalone model and its
    ONNX that score what the search recorded for that point."""
    from modelpress.cli import main
    from modelpress.models.saving import load_saved
    from modelpress.search.outputs import extract
    from modelpress.search.workers import load_evaluator

    tmp, full, _ = searched
    front = full["pareto"]
    assert len({p["objectives"]["quality"] for p in front}) > 1, front  # points that a wrong extraction confuses
    k = min(range(len(front)), key=lambda i: front[i]["objectives"]["quality"])  # the smallest, not the full model
    main(["search", "extract", str(tmp / "full"), "--point", str(k), "-o", str(tmp / "chosen"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["point"]["point"] == k and out["point"]["config"] == front[k]["config"]
    recorded = front[k]["objectives"]["quality"]
    ctx = load_evaluator(tmp / "full").ctx
    reloaded = load_saved(tmp / "chosen")
    assert ctx.evaluate(reloaded, torch_only=True).metrics["accuracy"] == pytest.approx(recorded, abs=0.006)
    assert ctx.evaluate(tmp / "chosen" / "model.onnx").metrics["accuracy"] == pytest.approx(recorded, abs=0.03)
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


def test_predictors_rank_held_out_evaluations(searched) -> None:  # noqa: ANN001
    """LINAS' predictors, fitted as the loop fits them on real evaluations of random (non-anchor) sub-networks,
    predict the quality of sub-networks they never saw: a small error where guessing the mean is far off, and
    the right order more often than not."""
    from modelpress.search.linas import Problem, fit_predictors, kendall_tau, predict
    from modelpress.search.space import dedupe
    from modelpress.search.workers import load_evaluator

    tmp, _, _ = searched
    ev = load_evaluator(tmp / "full")
    space = ev.net.space
    lo, up = space.bounds()
    problem = Problem(lower=lo, upper=up, decode=space.decode, objectives=["quality", "size"], maximize=["quality"],
                      cheap=ev.cheap, cheap_objectives=["size"], encode=space.encode)
    rng, seen, configs = np.random.default_rng(0), set(), []
    while len(configs) < 16:  # float only: quality evaluations stay cheap
        configs += dedupe([{**space.random(rng), "precision": dict.fromkeys(space.precision_layers, "float")}], seen)
    records = [{"x": space.encode(c).tolist(), "objectives": {"quality": ev.quality(c)[0]}} for c in configs]
    train, held_out = records[:10], records[10:]
    measured = np.array([r["objectives"]["quality"] for r in held_out])
    predicted = np.array([p["quality"] for p in predict(problem, fit_predictors(problem, train), [r["x"] for r in held_out])])
    guess = np.mean([r["objectives"]["quality"] for r in train])
    error, spread = np.abs(predicted - measured).mean(), np.abs(guess - measured).mean()
    assert spread > 0.1, measured  # the held-out points differ: a test a constant cannot pass
    assert error < 0.3 * spread, (predicted, measured)
    assert kendall_tau(predicted, measured) > 0.3, (predicted, measured)


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


MEASURED = dict(objectives=["quality", "latency"], latency="measured", latency_batch=8, budget=3, batch_size=3,
                uniform=(), space_options={**SPACE, "precisions": ("float",)})


@pytest.fixture(scope="module")
def measured(vit_graph, vit_data, tmp_path_factory):  # noqa: ANN001, ANN201
    """A search over quality and latency measured in ONNX Runtime (no latency model), in this process: the
    anchors (full, smallest) and one random sub-network, each exported, scored and timed."""
    tmp = tmp_path_factory.mktemp("measured")
    return tmp / "local", _search(vit_graph, vit_data, None, tmp, "local", **MEASURED)


def _records(run) -> list[dict]:  # noqa: ANN001
    return json.loads((run / "state.json").read_text())["records"]


def test_measured_latency_search(measured) -> None:  # noqa: ANN001
    run, result = measured
    assert not (run / "latency.json").exists()  # nothing predicted
    records, base = _records(run), result["baselines"]
    assert len(records) == 3 and len(list((run / "candidates").glob("*.onnx"))) == 1  # the non-anchor one
    ms = {json.dumps(r["config"], sort_keys=True): r["objectives"]["latency"] for r in records}
    assert all(np.isfinite(v) and v > 0 for v in ms.values()), ms
    full = base["points"]["full-float"]["objectives"]["latency"]
    # the full model timed against itself (interleaved) is the reference latency; the smallest is faster
    assert full == pytest.approx(base["reference_ms"], rel=0.3)
    assert base["points"]["smallest"]["objectives"]["latency"] < 0.9 * full, base
    # quality is scored on the ONNX file that was timed
    assert (run / "baselines" / "smallest.onnx").is_file()
    assert all(0 < r["objectives"]["quality"] <= 1 for r in records)


def test_ray_executor_measures_on_its_workers(measured, vit_graph, vit_data, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The same measured-latency search on a local Ray runtime (one worker): evaluations and the target's
    latency measurements run as Ray tasks in another process, and find what the local search found."""
    pytest.importorskip("ray", reason="the Ray executor needs the ray extra")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    local_run, _ = measured
    result = _search(vit_graph, vit_data, None, tmp_path, "ray", executor="ray", workers=1,
                     **{**MEASURED, "budget": 2, "batch_size": 2})  # the anchors: evaluated and timed as Ray tasks
    assert result["evaluated"] == 2 and result["pareto"]
    here, ray = _records(local_run)[:2], _records(tmp_path / "ray")
    assert [r["config"] for r in ray] == [r["config"] for r in here]
    assert [r["objectives"]["quality"] for r in ray] == [r["objectives"]["quality"] for r in here]
    assert all(np.isfinite(r["objectives"]["latency"]) and r["objectives"]["latency"] > 0 for r in ray)
    assert result["baselines"]["reference_ms"] > 0
    workers = {p.name for p in (tmp_path / "ray" / "work").iterdir()} - {str(os.getpid())}
    assert workers, "no evaluation ran outside this process"
