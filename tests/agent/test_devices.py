"""Remote targets where the toolkit uses a target: the latency table measured through an agent drives
prune.global, and class-wise placement measures each sub-model on two agents (two "devices")."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest

from modelpress import bench
from modelpress.bench import build_latency_table, get_target
from modelpress.bench import remote as remote_mod
from modelpress.errors import ModelpressError
from modelpress.targets import remote_target


def test_remote_target_names():
    t = get_target("remote:127.0.0.1:8765")
    assert t.remote and t.address == "http://127.0.0.1:8765" and t.name == "remote:127.0.0.1:8765"
    assert get_target("remote:https://dev.local:9000", threads=2).address == "https://dev.local:9000"
    assert remote_target("remote:[::1]:80").address == "http://[::1]:80"
    assert get_target("remote:h:1", threads=3).threads == 3
    for bad in ("remote:", "remote:host", "remote:host:port", "remote:ftp://h:1", "remote:h:1/x"):
        with pytest.raises(ModelpressError, match="not a device address"):
            get_target(bad)
    with pytest.raises(ModelpressError, match="runs in this process"):
        t.session("model.onnx")


def test_latency_table_through_an_agent_drives_prune_global(devices, zoo_vit, tmp_path):
    from modelpress.data import load_data
    from modelpress.data.tasks import ClassificationTask
    from modelpress.graph import ModelGraph
    from modelpress.passes import Context, registered_passes

    agent = devices[0]
    graph = ModelGraph(zoo_vit.module, zoo_vit.input_spec, name="digits-vit")
    target = remote_mod.resolve(get_target(agent.target))  # the device's own thread count: 1
    assert target.threads == 1
    before = agent.info()["measurements"]
    table = build_latency_table(graph, target, batch=64, grid="heads=1,4;mlp=64,256;embed=64", rounds=2, runs=3,
                                min_time_s=0.02, model_rounds=2, clock="cpu", cache_dir=tmp_path / "cache")
    assert table.key["target"]["name"] == agent.target and table.key["target"]["threads"] == 1
    assert agent.info()["measurements"] == before + 2  # the blocks, then the whole-model references
    data = load_data("digits", graph.input_spec, batch_size=32, n_calibration=96, n_evaluation=None)
    ctx = Context(workdir=tmp_path, task=ClassificationTask(), data=data, reference=graph, seed=0,
                  latency_model=table, target=target)
    cls = registered_passes()["prune.global"]
    full = table.predict(graph)
    # the table decides (the confirming measurement on the device is the bench path tested above)
    result = cls(cls.Config(saliency="magnitude", target="latency", ratio=0.8, iterations=1,
                            measure=False)).apply(graph, ctx)
    m = result.metrics
    assert table.predict(result.graph) == pytest.approx(m["ratio_reached"] * full, rel=1e-6)
    assert m["ratio_reached"] <= 0.82 and result.graph.num_parameters() < graph.num_parameters()


def test_classwise_placement_uses_each_agents_measurements(devices, zoo_cnn, tmp_path, monkeypatch):
    from modelpress.graph import ModelGraph
    from modelpress.progress import QUIET
    from modelpress.prune.classwise.measure import FULL, device_memory, measure_latencies
    from modelpress.prune.placement import Device, assign

    graph = ModelGraph(zoo_cnn.module, zoo_cnn.input_spec, name="digits-cnn")
    small = graph.copy()
    subs = [SimpleNamespace(name="sub0", graph=graph), SimpleNamespace(name="sub1", graph=small)]
    runs: dict[str, remote_mod.RemoteRun] = {}
    real = remote_mod.measure_remote

    def recording(target, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        runs[target.name] = real(target, *args, **kwargs)
        return runs[target.name]

    monkeypatch.setattr(remote_mod, "measure_remote", recording)
    monkeypatch.setattr(bench, "measure", functools.partial(bench.measure, rounds=2, runs=3, min_time_s=0.0))
    devices_ = [device_memory(Device(f"dev{i}", None, a.target)) for i, a in enumerate(devices)]
    # no budget given: each device holds what its agent reports available
    for d, a in zip(devices_, devices, strict=True):
        assert d.memory_bytes is not None and d.memory_bytes > 2**20 and a.target == d.target
    lat = measure_latencies(graph, subs, devices_, tmp_path, QUIET)
    assert set(runs) == {a.target for a in devices}  # one measurement on each device
    for j, a in enumerate(devices):
        run = runs[a.target]
        assert run.target["threads"] == a.threads
        import numpy as np

        for i, s in enumerate(subs):
            (rounds,) = run.samples[s.name].values()
            assert lat.sub_models[i][j] == pytest.approx(float(np.median([np.median(r) for r in rounds])))
        assert lat.full[j] is not None and FULL in run.samples
    plan = assign(lat.sub_models, [10, 10], devices_, ["sub0", "sub1"])
    assert plan.latency_ms == lat.sub_models and sorted(plan.device) in (["dev0", "dev1"], ["dev0", "dev0"],
                                                                         ["dev1", "dev1"])
