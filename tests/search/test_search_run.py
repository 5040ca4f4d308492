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
from tests.search.runs import MEASURED, search

pytest.importorskip("pymoo")


def _csv(path) -> list[dict]:  # noqa: ANN001
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_search_outputs(searched, full_ev) -> None:  # noqa: ANN001
    tmp, full, part, *_ = searched
    assert full["evaluated"] == 10 and full["pareto"] and full["hypervolume"] > 0
    assert part["evaluated"] == 6
    base = full["baselines"]["points"]
    assert {"full-float", "full-int8", "smallest-int8"} == set(base)
    assert base["full-float"]["objectives"]["quality"] > 0.9
    assert base["full-int8"]["objectives"]["size"] < 0.5 * base["full-float"]["objectives"]["size"]
    for name in ("pareto.csv", "pareto.json", "state.json", "search.json", "precision.json", "measurements.json"):
        assert (tmp / "full" / name).is_file()
    state = json.loads((tmp / "full" / "state.json").read_text())
    first = [r for r in state["records"] if r["batch"] == 0]
    # the first batch measures the anchors first (reusing their baseline values), then random sub-networks
    assert [r["config"] for r in first[:3]] == [base[n]["config"] for n in ("full-float", "full-int8", "smallest-int8")]
    assert [r["objectives"] for r in first[:3]] == [base[n]["objectives"] for n in ("full-float", "full-int8",
                                                                                    "smallest-int8")]
    assert len(first) == 6 and len({json.dumps(r["config"], sort_keys=True) for r in first}) == 6
    # the second batch carries the quality predicted before it was measured, inside the metric's range
    second = [r for r in state["records"] if r["batch"] == 1]
    assert second and all(0.0 <= r["predicted"]["quality"] <= 1.0 for r in second)
    assert all(r["predicted"] is None for r in first)
    # the reported front: measured latency beside the latency model's prediction, and the predictor's error
    assert full["latency_source"] == "measured" and full["latency_mode"] == "predicted"
    rows = _csv(tmp / "full" / "pareto.csv")
    assert len(rows) == len(full["pareto"])
    for row, p in zip(rows, full["pareto"], strict=True):
        assert row["latency_source"] == "measured"
        assert float(row["latency_measured_ms"]) == pytest.approx(p["measured"]["latency"])
        assert float(row["latency_predicted_ms"]) == pytest.approx(p["predicted"]["latency"])
        assert p["objectives"]["latency"] == p["measured"]["latency"]
        assert float(row["speedup_vs_int8_measured"]) > 0
    assert full["predictor_error_on_front"]["latency"]["points"] == len(full["pareto"])
    # the precision table: one measured saving per layer kind and precision, adding up to full INT8's
    table = json.loads((tmp / "full" / "precision.json").read_text())
    assert set(table["savings"]) == {"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                                     "mlp.fc1", "mlp.fc2"}
    assert all(np.isfinite(v["int8"]) for v in table["savings"].values())
    ev = full_ev  # the latency model then predicts full INT8 at its measured share
    ratio = ev.predicted_latency(ev.net.space.largest("int8")) / ev.predicted_latency(ev.net.space.largest("float"))
    assert table["measured"]["notes"] or ratio == pytest.approx(1 - table["full"]["int8"], rel=1e-6)
    # reconstruction ran on the cut sub-networks, and its cost is reported
    assert full["cost"]["reconstruct_s_per_point"] > 0


def test_predicted_only_run_says_so(searched) -> None:  # noqa: ANN001
    """A predicted-latency search whose front is not measured (the stopped and resumed run) labels its latency
    as predicted everywhere and refuses to select on it."""
    from modelpress.search.outputs import extract

    tmp, _, _, resumed, _ = searched
    assert resumed["latency_source"] == "predicted-only"
    rows = _csv(tmp / "part" / "pareto.csv")
    assert rows and all(r["latency_source"] == "predicted-only" and r["latency_measured_ms"] == "" for r in rows)
    assert all(float(r["latency_predicted_ms"]) > 0 for r in rows)
    assert not (tmp / "part" / "measurements.json").exists()
    with pytest.raises(ModelpressError, match="predicted only"):
        extract(tmp / "part", tmp / "out", max_latency=1e9)
    assert not (tmp / "out").exists()


def test_extract_a_point(searched, full_ev, capsys) -> None:  # noqa: ANN001
    """`modelpress search extract RUN_DIR --point N -o OUT` (no checkpoint argument): a standalone model and its
    ONNX that score what the search recorded for that point."""
    from modelpress.cli import main
    from modelpress.models.saving import load_saved
    from modelpress.search.outputs import extract

    tmp, full, *_ = searched
    front = full["pareto"]
    assert len({p["objectives"]["quality"] for p in front}) > 1, front  # points that a wrong extraction confuses
    full_float = full["baselines"]["points"]["full-float"]["config"]
    # the point whose latency the latency model predicted worst (not the full float model): where reporting the
    # prediction instead of the measurement would show
    gap = {i: abs(p["predicted"]["latency"] / p["objectives"]["latency"] - 1) for i, p in enumerate(front)
           if p["config"] != full_float}
    k = max(gap, key=gap.get)
    main(["search", "extract", str(tmp / "full"), "--point", str(k), "-o", str(tmp / "chosen"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["point"]["point"] == k and out["point"]["config"] == front[k]["config"]
    recorded = front[k]["objectives"]["quality"]
    ctx = full_ev.ctx
    reloaded = load_saved(tmp / "chosen")
    assert ctx.evaluate(reloaded, torch_only=True).metrics["accuracy"] == pytest.approx(recorded, abs=0.006)
    assert ctx.evaluate(tmp / "chosen" / "model.onnx").metrics["accuracy"] == pytest.approx(recorded, abs=0.03)
    with pytest.raises(ModelpressError, match="no point"):
        extract(tmp / "full", tmp / "none", min_quality=1.5)
    # the reported latency is the search's own measurement of that point (measurements.json's rounds against
    # full float), not the latency model's prediction
    from modelpress.search.space import config_key

    searched_rounds = json.loads((tmp / "full" / "measurements.json").read_text())[
        config_key(front[k]["config"])]["rounds_vs_float"]
    reported = full["baselines"]["reference_ms"] / front[k]["objectives"]["latency"]
    assert reported == pytest.approx(float(np.median(searched_rounds)), rel=1e-9)
    # and extraction timed the file it wrote in fresh rounds interleaved with the run's full float and full INT8
    # models. Whether those rounds reproduce the search's own is a statistical check over rounds
    # (latency_check; tested with chosen rounds in test_extract_checks_latency_against_the_search); what it says
    # here depends on the machine's load, so it is not asserted: on a shared 2-core machine two rounds of a
    # test-sized model spread from 0.99x to 1.55x (CI).
    fresh = out["point"]["measured_at_extraction"]["rounds_vs_float"]
    assert len(fresh) == full_ev.settings.rounds >= 2
    assert all(np.isfinite(r) and r > 0 for r in fresh), fresh
    written = json.loads((tmp / "chosen" / "search_point.json").read_text())
    assert written["measured_at_extraction"]["rounds_vs_float"] == fresh
    assert written["latency_check"]["verdict"] in ("consistent", "inconsistent", "undecided")


class _FakeReport:
    """What ``Context.measure`` returns, built from chosen per-round medians (ms) per variant: no timing."""

    def __init__(self, rounds_ms: dict[str, list[float]], baseline: str) -> None:
        self.rounds_ms, self.baseline = rounds_ms, baseline

    def stats(self, name: str, batch: int, seq: int | None = None):  # noqa: ANN201
        from types import SimpleNamespace

        mine, base = self.rounds_ms[name], self.rounds_ms[self.baseline]
        ratios = [b / m for b, m in zip(base, mine, strict=True)]
        return SimpleNamespace(median_ms=float(np.median(mine)), speedup=float(np.median(ratios)),
                               speedup_rounds=ratios, round_medians_ms=list(mine))


def test_extract_checks_latency_against_the_search(searched, tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """Extraction compares its fresh interleaved rounds with the rounds the search measured for the point
    (statistically, over rounds): the search's rounds are written into a copy of the run and the fresh
    measurement is faked with chosen rounds. The same speedups: consistent, no warning; 25% slower in every
    round: the verdict, its statistic and interval land in search_point.json and a one-line warning says by how
    much and to measure more rounds (from the library as a warning, from the CLI on stderr)."""
    import shutil
    import warnings

    from modelpress.cli import main
    from modelpress.passes import Context
    from modelpress.search.outputs import LatencyNotReproduced, extract
    from modelpress.search.space import config_key

    tmp, full, *_ = searched
    run = tmp_path / "run"
    shutil.copytree(tmp / "full", run, ignore=shutil.ignore_patterns("work", "candidates"))
    point = full["pareto"][0]
    rows = json.loads((run / "measurements.json").read_text())
    searched_row = rows[config_key(point["config"])]  # the search timed the point against both references
    assert len(searched_row["rounds_vs_float"]) == len(searched_row["rounds_vs_int8"]) == 2
    searched_row.update(rounds_vs_float=[2.00, 2.04, 1.98], rounds_vs_int8=[1.25, 1.27, 1.24])
    (run / "measurements.json").write_text(json.dumps(rows))
    fresh: dict[str, list[float]] = {}
    calls: list[dict] = []

    def fake_measure(self, variants, *, baseline=None, **timing):  # noqa: ANN001, ANN202
        calls.append({"names": sorted(variants), "baseline": baseline, "rounds": timing["rounds"]})
        return _FakeReport(fresh, baseline)

    monkeypatch.setattr(Context, "measure", fake_measure)
    # full float 10 ms and full INT8 6.25 ms a round; the point as the search saw it: 2.0x and 1.25x
    fresh.update({"__full-float__": [10.0, 10.2, 9.9], "__full-int8__": [6.25, 6.3, 6.2], "point": [5.0, 5.05, 4.98]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatencyNotReproduced)
        same = extract(run, tmp_path / "same", point=0, rounds=3)
    assert calls[-1] == {"names": ["__full-float__", "__full-int8__", "point"], "baseline": "__full-float__",
                         "rounds": 3}
    check = same["point"]["latency_check"]
    assert check["verdict"] == "consistent" and set(check["references"]) == {"vs_float", "vs_int8"}
    assert same["warnings"] == []
    # every fresh round 25% slower: 1.5x over full float, 0.94x over full INT8
    fresh["point"] = [6.67, 6.8, 6.6]
    with pytest.warns(LatencyNotReproduced, match=r"not reproduced: .*-25%.*--rounds 6"):
        moved = extract(run, tmp_path / "moved", point=0, rounds=3)
    written = json.loads((tmp_path / "moved" / "search_point.json").read_text())
    check = written["latency_check"]
    assert check == moved["point"]["latency_check"] and check["verdict"] == "inconsistent"
    for key in ("vs_float", "vs_int8"):
        ref = check["references"][key]
        assert ref["verdict"] == "inconsistent" and ref["p_value"] < 0.05 and ref["statistic"] < 0
        assert ref["interval"][1] < 0.95 and ref["rounds"] == [3, 3]
    assert written["measured_at_extraction"]["rounds_vs_float"] == pytest.approx([10.0 / 6.67, 10.2 / 6.8, 9.9 / 6.6])
    assert len(moved["warnings"]) == 1 and "\n" not in moved["warnings"][0]
    # the CLI: the same line on stderr, even with --json; --rounds reaches the measurement
    main(["search", "extract", str(run), "--point", "0", "-o", str(tmp_path / "cli"), "--rounds", "5", "--json"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["point"]["latency_check"]["verdict"] == "inconsistent"
    assert captured.err.count("warning: the search's latency was not reproduced") == 1
    assert calls[-1]["rounds"] == 5


def test_a_narrowed_int8_model_reloads(full_ev, tmp_path) -> None:  # noqa: ANN001
    """A sub-network both narrowed and in INT8 (what ``search extract`` writes for such a front point) saves and
    reloads to the same outputs."""
    from modelpress.models.saving import load_saved, save

    graph, _ = full_ev.build(full_ev.net.space.uniform(0.5, "int8"), reconstruct=False)
    save(graph, tmp_path / "m")
    x = graph.example_inputs(2, seed=1)
    assert torch.allclose(load_saved(tmp_path / "m").forward(x), graph.forward(x), atol=1e-4)


def test_reconstruction_raises_held_out_quality(full_ev) -> None:  # noqa: ANN001
    """Extraction refits the readers of removed units on the calibration split; the sub-network's accuracy on
    the held-out split (disjoint from the calibration samples) goes up."""
    ev = full_ev
    config = ev.net.space.uniform(0.25, "float")
    plain, rebuilt = ev.quality(config, reconstruct=False), ev.quality(config, reconstruct=True)
    assert rebuilt > plain + 0.05, (plain, rebuilt)


def test_reconstruction_fits_train_samples_but_not_the_held_back_batch(full_ev) -> None:  # noqa: ANN001
    """The refit's rows: the calibration split but its last batch (held back: it decides whether the refit is
    kept), plus train-split samples up to the spec's count, which came to the workers in the run's data file
    (the train split holds the calibration samples: those of the held-back batch are left out)."""
    fit, check = full_ev.fit_batches()
    calibration = full_ev.ctx.calibration.batches
    assert check is calibration[-1] and full_ev.settings.reconstruct_target == "stream"
    key = next(iter(check))
    held_back = {tuple(r.flatten().tolist()) for r in check[key]}
    rows = [tuple(r.flatten().tolist()) for b in fit for r in b[key]]
    assert len(rows) == sum(len(b[key]) for b in calibration[:-1]) + full_ev.settings.reconstruct_samples
    assert not held_back & set(rows)


def test_precision_genes_keep_reparameterization_where_a_norms_readers_agree(full_ev) -> None:  # noqa: ANN001
    """One precision gene per Linear may split the readers of one LayerNorm (one of q/k/v float, the others
    INT8): that norm keeps per-tensor input scales, every other norm is reparameterized (its readers share
    one quantizer), and the mixed model still scores close to full INT8."""
    ev = full_ev
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
    mixed = ev.quality(config)
    full_int8 = ev.quality(ev.net.space.largest("int8"))
    assert mixed >= full_int8 - 0.03, (mixed, full_int8)


def test_predictors_rank_held_out_evaluations(full_ev) -> None:  # noqa: ANN001
    """LINAS' predictors, fitted as the loop fits them on real evaluations of random (non-anchor) sub-networks,
    predict the quality of sub-networks they never saw: a small error where guessing the mean is far off, and
    the right order more often than not."""
    from modelpress.search.linas import Problem, fit_predictors, kendall_tau, predict
    from modelpress.search.space import dedupe
    ev = full_ev
    space = ev.net.space
    lo, up = space.bounds()
    problem = Problem(lower=lo, upper=up, decode=space.decode, objectives=["quality", "size"], maximize=["quality"],
                      cheap=ev.cheap, cheap_objectives=["size"], encode=space.encode)
    rng, seen, configs = np.random.default_rng(0), set(), []
    # 20 to fit: with the stream-target refit on train samples (the search's evaluation) the landscape is rougher
    # than with the old refit; 10 random evaluations (3 for each of 4 blocks' genes) left the error at about half
    # the guess's spread
    while len(configs) < 26:  # float only: quality evaluations stay cheap
        configs += dedupe([{**space.random(rng), "precision": dict.fromkeys(space.precision_layers, "float")}], seen)
    records = [{"x": space.encode(c).tolist(), "objectives": {"quality": ev.quality(c)}} for c in configs]
    train, held_out = records[:20], records[20:]
    measured = np.array([r["objectives"]["quality"] for r in held_out])
    predicted = np.array([p["quality"] for p in predict(problem, fit_predictors(problem, train), [r["x"] for r in held_out])])
    guess = np.mean([r["objectives"]["quality"] for r in train])
    error, spread = np.abs(predicted - measured).mean(), np.abs(guess - measured).mean()
    assert spread > 0.1, measured  # the held-out points differ: a test a constant cannot pass
    assert error < 0.3 * spread, (predicted, measured)
    assert kendall_tau(predicted, measured) > 0.3, (predicted, measured)


def test_interrupted_search_resumes_to_the_same_result(searched, vit_graph, vit_data, vit_table) -> None:  # noqa: ANN001
    """The search stopped after its first batch and resumed (``searched``'s part) ends with the uninterrupted
    run's candidates and values; a run folder is not overwritten, nor resumed with another space."""
    tmp, full, part, resumed, _ = searched
    assert part["evaluated"] == 6 and resumed["evaluated"] == full["evaluated"] == 10
    a = json.loads((tmp / "full" / "state.json").read_text())["records"]
    b = json.loads((tmp / "part" / "state.json").read_text())["records"]
    assert [r["config"] for r in a] == [r["config"] for r in b]
    assert [r["objectives"] for r in a] == [r["objectives"] for r in b]
    assert [r["predicted"] for r in a] == [r["predicted"] for r in b]  # the resumed predictors fit the same records
    with pytest.raises(ModelpressError, match="already holds"):
        search(vit_graph, vit_data, vit_table, tmp, "part")
    # a run folder of another space is refused, and left as it was
    before = (tmp / "part" / "state.json").read_text()
    with pytest.raises(ModelpressError, match="another model or space"):
        search(vit_graph, vit_data, vit_table, tmp, "part", resume=True, space={"mlp_fractions": (0.5, 1.0)})
    assert (tmp / "part" / "state.json").read_text() == before


def test_bad_input_is_a_short_error(vit_graph, vit_data, vit_table, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ModelpressError, match="unknown objective 'speed'"):
        search(vit_graph, vit_data, vit_table, tmp_path, "a", objectives=["quality", "speed"])
    with pytest.raises(ModelpressError, match="smaller than one batch"):
        search(vit_graph, vit_data, vit_table, tmp_path, "b", budget=2, batch_size=4, objectives=["quality", "size"])
    assert not (tmp_path / "b").exists()  # refused before any work
    with pytest.raises(ModelpressError, match="latency batch 4 does not fit the latency table's batch 1"):
        search(vit_graph, vit_data, vit_table, tmp_path, "d", latency_batch=4)
    with pytest.raises(ModelpressError, match="unknown reconstruction target 'block'"):
        search(vit_graph, vit_data, vit_table, tmp_path, "e", reconstruct_target="block")
    with pytest.raises(ModelpressError, match="empty"):
        search(vit_graph, vit_data, vit_table, tmp_path, "c", objectives=["quality", "size"],
               space={"head_fractions": (1.0,), "mlp_fractions": (1.0,), "skip_blocks": False,
                      "precisions": ("float",)})


def _records(run) -> list[dict]:  # noqa: ANN001
    return json.loads((run / "state.json").read_text())["records"]


def test_measured_latency_search(measured) -> None:  # noqa: ANN001
    run, result = measured
    assert not (run / "latency.json").exists() and not (run / "precision.json").exists()  # nothing predicted
    records, base = _records(run), result["baselines"]
    assert len(records) == 3 and len(list((run / "candidates").glob("*.onnx"))) == 1  # the non-anchor one
    assert result["latency_source"] == "measured" and result["latency_mode"] == "measured"
    ms = {json.dumps(r["config"], sort_keys=True): r["objectives"]["latency"] for r in records}
    assert all(np.isfinite(v) and v > 0 for v in ms.values()), ms
    full = base["points"]["full-float"]["objectives"]["latency"]
    # the full model timed against itself (interleaved) is the reference latency; the smallest is faster
    assert full == pytest.approx(base["reference_ms"], rel=0.3)
    assert base["points"]["smallest"]["objectives"]["latency"] < 0.9 * full, base
    assert all(0 < r["objectives"]["quality"] <= 1 for r in records)


def _guard() -> None:
    """A Ray worker's setup: another working directory, and the driver's run folder unreadable (every
    Python-level open or listing of a path inside it raises); both paths come in the worker's environment."""
    import sys

    run, elsewhere = os.environ["GUARDED_RUN"], os.environ["WORKER_CWD"]
    os.chdir(elsewhere)

    def hook(event: str, args: tuple) -> None:
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path == run or path.startswith(run + os.sep):
                raise PermissionError(f"the driver's run folder is not readable here: {path}")

    sys.addaudithook(hook)


def test_ray_workers_need_no_shared_disk(measured, vit_graph, vit_data, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The measured-latency search on a local Ray runtime whose workers run in another working directory and
    cannot read the driver's run folder: their inputs come through Ray's object store, their results (and
    ONNX bytes) come back, and the search finds what the local one found."""
    ray = pytest.importorskip("ray", reason="the Ray executor needs the ray extra")
    from pathlib import Path

    local_run, _ = measured
    driver, elsewhere = tmp_path / "driver", tmp_path / "elsewhere"
    driver.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(driver)
    run = (driver / "ray").resolve()
    root = Path(__file__).resolve().parents[2]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env={
        "env_vars": {"PYTHONPATH": f"{root / 'src'}:{root}", "RAY_DEDUP_LOGS": "0", "GUARDED_RUN": str(run),
                     "WORKER_CWD": str(elsewhere)},
        "worker_process_setup_hook": _guard})
    try:
        result = search(vit_graph, vit_data, None, tmp_path, run, executor="ray",
                         **{**MEASURED, "budget": 2, "batch_size": 2})  # the anchors: evaluated and timed as Ray tasks
    finally:
        ray.shutdown()
    assert result["evaluated"] == 2 and result["pareto"] and result["latency_source"] == "measured"
    here, there = _records(local_run)[:2], _records(run)
    assert [r["config"] for r in there] == [r["config"] for r in here]
    assert [r["objectives"]["quality"] for r in there] == [r["objectives"]["quality"] for r in here]
    assert all(np.isfinite(r["objectives"]["latency"]) and r["objectives"]["latency"] > 0 for r in there)
    workers = json.loads((run / "costs.json").read_text())
    assert workers and all(c["worker"]["cwd"] == str(elsewhere) and c["worker"]["pid"] != os.getpid()
                           for c in workers), workers
