"""prune.global: one ranking across kinds, iterated to a target, on the trained digits ViT."""

from __future__ import annotations

import numpy as np
import pytest

from modelpress.data import load_data
from modelpress.data.tasks import ClassificationTask
from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.passes import Context, registered_passes


@pytest.fixture(scope="module")
def setup(zoo_vit):  # noqa: ANN001
    graph = ModelGraph(zoo_vit.module, zoo_vit.input_spec, name="digits-vit")
    data = load_data("digits", graph.input_spec, batch_size=32, n_calibration=192, n_evaluation=None)
    return graph, data


def _run(setup, tmp_path, **config):  # noqa: ANN001, ANN202
    graph, data = setup
    ctx = Context(workdir=tmp_path, task=ClassificationTask(), data=data, reference=graph, seed=0)
    cls = registered_passes()["prune.global"]
    result = cls(cls.Config(**config)).apply(graph, ctx)
    return result, ctx


def test_parameter_target_is_met_with_rounded_widths(setup, tmp_path) -> None:  # noqa: ANN001
    graph, _ = setup
    result, ctx = _run(setup, tmp_path, saliency="hessian", target="params", ratio=0.5, iterations=2)
    pruned = result.graph
    m = result.metrics
    assert m["ratio_reached"] <= 0.5 + 0.02
    for path, row in m["widths"].items():
        assert row["mlp"] % 8 == 0 and row["head_dim"] % 8 == 0 and row["heads"] >= 1
        block = pruned.module.get_submodule(path)  # the reported widths are the module's own
        att = block.attention
        assert (att.num_attention_heads, att.head_dim) == (row["heads"], row["head_dim"])
        assert att.q_proj.out_features == att.o_proj.in_features == row["heads"] * row["head_dim"]
        assert block.mlp.fc1.out_features == row["mlp"]
    assert graph.num_parameters() == m["params_before"]  # the input graph is untouched
    evaluation = ctx.evaluate(pruned)  # exported, verified against torch, scored in ONNX Runtime
    assert evaluation.export.verification.ok
    assert evaluation.metrics["accuracy"] > 0.9


def test_hessian_keeps_more_than_magnitude(setup, tmp_path) -> None:  # noqa: ANN001
    scores = {}
    for saliency in ("hessian", "magnitude"):
        result, ctx = _run(setup, tmp_path / saliency, saliency=saliency, target="params", ratio=0.4, iterations=2)
        scores[saliency] = ctx.evaluate(result.graph, torch_only=True).metrics["agreement"]
    assert scores["hessian"] > scores["magnitude"], scores


def test_macs_target_and_determinism(setup, tmp_path) -> None:  # noqa: ANN001
    a, _ = _run(setup, tmp_path / "a", saliency="hessian", target="macs", ratio=0.6, iterations=1, kinds=["mlp", "head"])
    b, _ = _run(setup, tmp_path / "b", saliency="hessian", target="macs", ratio=0.6, iterations=1, kinds=["mlp", "head"])
    assert a.metrics["ratio_reached"] <= 0.62
    assert a.metrics["widths"] == b.metrics["widths"]
    sa, sb = a.graph.state(), b.graph.state()
    assert all(np.array_equal(sa[k].detach().numpy(), sb[k].detach().numpy()) for k in sa)


def test_unreachable_target_is_a_short_error(setup, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ModelpressError, match="floors"):
        _run(setup, tmp_path, saliency="magnitude", target="params", ratio=0.05, iterations=1, kinds=["mlp"])


def test_latency_target_needs_a_latency_model(setup, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ModelpressError, match="latency model"):
        _run(setup, tmp_path, saliency="magnitude", target="latency", ratio=0.5)


def test_latency_target_from_a_measured_table(setup, tmp_path) -> None:  # noqa: ANN001
    from modelpress.bench import build_latency_table, get_target
    from modelpress.bench.latency import graph_widths

    graph, _ = setup
    target = get_target("ort-cpu", threads=1)
    table = build_latency_table(graph, target, batch=64, grid="heads=1,4;mlp=32,256;embed=64", rounds=2, runs=5,
                                min_time_s=0.02, model_rounds=2, clock="cpu", cache_dir=tmp_path / "cache")
    # at batch 1 this tiny ViT is overhead-bound (its blocks are a small share of its latency), so the table
    # is measured at batch 64; the measured fixed share still varies with the machine's load, so the target
    # is set between the full model and the floor this table can reach (one head, 5% MLP per block), <= 0.6
    blocks, _ = graph_widths(graph)
    floor = table.predict_widths([(1, b["head_dim"], max(8, round(0.05 * b["mlp"] / 8) * 8)) for b in blocks])
    full = table.predict(graph)
    ratio = max(0.6, 0.5 * (1 + floor / full))
    assert ratio < 0.9, f"the measured table leaves almost nothing to prune (floor {floor:.3f} of {full:.3f} ms)"
    cls = registered_passes()["prune.global"]
    _, data = setup
    ctx = Context(workdir=tmp_path, task=ClassificationTask(), data=data, reference=graph, seed=0, latency_model=table,
                  target=target)
    result = cls(cls.Config(saliency="hessian", target="latency", ratio=ratio, iterations=2, confirm_rounds=0,
                            reconstruct=False)).apply(graph, ctx)
    m = result.metrics
    # the last iteration aims where the measurement before it says the target lies (on a loaded machine that is
    # not the asked ratio of the table's prediction); the pass reaches its aim in the table's terms
    aimed = m["confirmations"][0]["aimed_goal"]
    assert 0.5 * ratio <= aimed <= 2 * ratio
    assert m["ratio_reached"] <= aimed + 0.02
    assert table.predict(result.graph) == pytest.approx(m["ratio_reached"] * full, rel=1e-6)
    assert m["predicted_speedup"] == pytest.approx(1 / m["ratio_reached"])
    assert result.graph.num_parameters() < graph.num_parameters()
    # the measurement path ran for real: measured before the last iteration, then once more at the end (confirm_rounds 0), each recorded;
    # timings on a shared machine are noisy, so only a generous margin is asked of the measured speedup
    confirmations = m["confirmations"]
    assert confirmations[0]["stage"] == "before the last iteration" and len(confirmations) == 2
    assert all(np.isfinite(c["measured_speedup"]) and c["measured_speedup"] > 0 for c in confirmations)
    assert m["measured_speedup"] == confirmations[-1]["measured_speedup"] > 1.15


@pytest.mark.parametrize("slower", [True, False], ids=["table-too-optimistic", "table-too-pessimistic"])
def test_the_measured_latency_meets_the_target_when_the_table_is_off(setup, tmp_path, monkeypatch, slower) -> None:  # noqa: ANN001
    """The latency model is off (a fixed overhead it does not see, or savings it under-counts); the pass
    measures before its last iteration and aims that one by the measurement, then confirms and, while
    still short, prunes on. The measured latency lands at the target either way."""
    import itertools

    from modelpress.bench import get_target
    from modelpress.bench import latency as L
    from modelpress.prune import global_

    graph, data = setup
    target = get_target("ort-cpu", threads=1)
    # an analytic table (no timing, so the same on every machine): block latency linear in heads and MLP
    key = L.table_key(graph, target, grid="heads=1,2,4;mlp=32,128,256;embed=64")
    axes, arch = key["axes"], key["architecture"]
    values = [0.2 + 0.5 * h / arch["heads"] + 0.3 * m / arch["mlp"]
              for h, _d, m, _e in itertools.product(*(axes[a] for a in L.AXES))]
    calibration = [{"embed": e, "rest_ms": 0.5, "scale": 1.0, "fixed_share": 0.0, "full_ms": 0.0,
                    "one_block_ms": 0.0, "block_in_model_ms": 1.0, "block_standalone_ms": 1.0} for e in axes["embed"]]
    table = L.LatencyTable(key=key, versions=L.measurement_versions(), axes=axes, block_ms_grid=values,
                           standalone_ms_grid=values, block_cv=[0.0] * len(values), calibration=calibration)
    base = table.predict(graph)

    def measured(original, pruned, ctx) -> float:  # noqa: ANN001
        p = table.predict(pruned) / base
        return 1.0 / (0.2 + 0.8 * p if slower else 0.85 * p)

    monkeypatch.setattr(global_, "_measured_speedup", measured)
    ctx = Context(workdir=tmp_path, task=ClassificationTask(), data=data, reference=graph, seed=0,
                  latency_model=table, target=target)
    cls = registered_passes()["prune.global"]
    m = cls(cls.Config(saliency="hessian", target="latency", ratio=0.6, iterations=2)).apply(graph, ctx).metrics
    first, last = m["confirmations"][0], m["confirmations"][-1]
    assert first["stage"] == "before the last iteration"
    assert 0.5 <= 1 / last["measured_speedup"] <= 0.62  # at the target, not far past it
    assert m["measured_speedup"] == last["measured_speedup"]
    if slower:
        assert m["predicted_speedup"] > last["measured_speedup"]
        # confirm_rounds 0: measured once and reported, no pruning on, although the measurement misses the
        # target (at 0.45 it misses wherever the one iteration lands above 0.34 of the predicted latency)
        settings = {"saliency": "hessian", "target": "latency", "ratio": 0.45, "iterations": 1}
        once = cls(cls.Config(**settings, confirm_rounds=0)).apply(graph, ctx).metrics
        unmeasured = cls(cls.Config(**settings, measure=False)).apply(graph, ctx).metrics
        assert len(once["confirmations"]) == 1 and 1 / once["measured_speedup"] > 0.45 + 0.02
        assert once["ratio_reached"] == unmeasured["ratio_reached"]
    else:
        assert m["predicted_speedup"] < last["measured_speedup"]


@pytest.mark.parametrize("first", ["block", "embedding"])
def test_a_plan_with_a_block_and_residual_channels_saves_what_it_counts(setup, first) -> None:  # noqa: ANN001
    """A residual channel's slices inside a removed block are saved once: the plan's counted saving is the
    parameters the edited model really loses, whichever of the two the ranking takes first."""
    from modelpress.prune.budget import Costs
    from modelpress.prune.global_ import _Candidate, _plan_removals

    graph, _ = setup
    work = graph.copy()
    costs = Costs(work, "params")
    emb = next(g for g in work.groups if g.kind == "embedding")
    path = work.blocks[0].path
    block_cost = costs.block(work, path)
    unit_cost = costs.units(work, emb)
    inside = costs.units_inside(work, emb, [path], unit_cost)[path]
    assert 0 < inside[0] < unit_cost[0]  # a residual channel has slices inside and outside every block
    n = emb.size // 4
    # "embedding": n channels rank before the block, the rest after it; "block": the block ranks first
    block_rank = 0.0 if first == "block" else n + 0.5
    cands = [_Candidate(f"block:{path}", 0, 0.0, block_cost, rank=block_rank)]
    cands += [_Candidate(emb.name, u, 0.0, float(unit_cost[u]), rank=float(u) + (u >= n) * 1.0,
                         inside={path: float(inside[u])}) for u in range(emb.size)]
    need = block_cost + n * (unit_cost[0] - inside[0]) + 1.0  # the block and n + 1 channels outside it
    plan, blocks = _plan_removals(work, cands, need, {}, {}, {g.name: g.size for g in work.groups})
    assert blocks == [path] and len(plan[emb.name]) == n + 1
    before = work.num_parameters()
    work.remove_many(list(plan.items()))
    work.remove_blocks(blocks)
    assert before - work.num_parameters() >= need
