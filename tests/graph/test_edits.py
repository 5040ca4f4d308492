"""Cached discovery, unit lineage, and the permute / slice edits (exact, recorded, replayable)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.models import load_saved, save
from tests.graph.models_zoo import build, fresh
from tests.graph.test_families import EXPECTED_KINDS


def _inputs(graph, seed: int = 3):
    return graph.example_inputs(2, 12 if graph.input_spec.kind == "text" else None, seed=seed)


def _group_table(graph) -> list[tuple]:
    return [
        (g.name, g.kind, g.prunable, [{k: v.tolist() for k, v in sorted(u.items())} for u in g.units])
        for g in graph.groups
    ]


@pytest.fixture
def export_calls(monkeypatch):
    """Counts torch.export.export calls."""
    calls = []
    real = torch.export.export

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


def test_copy_and_unit_edits_never_retrace(export_calls):
    g = build("bert")
    table, blocks, norms = _group_table(g), list(g.blocks), g.norm_consumers()
    traced = len(export_calls)
    assert traced == 1  # groups, blocks and LayerNorm consumers share one trace

    c = g.copy()
    assert _group_table(c) == table
    assert c.blocks == blocks
    assert c.norm_consumers() == norms
    c.remove("head:encoder.layer.0.attention", [1])
    c.remove_many([("mlp:encoder.layer.1", list(range(0, 128, 3))), ("embedding", [5, 9])], force=True)
    c.permute("mlp:encoder.layer.0", np.random.default_rng(0).permutation(128))
    c.slice("head:encoder.layer.1.attention", [3, 0])
    c.summary()
    assert len(export_calls) == traced
    assert _group_table(g) == table  # the original is untouched

    # the re-indexed groups are those a fresh trace of the edited module finds
    fresh = ModelGraph(copy.deepcopy(c.module), c.input_spec, c.source)
    assert _group_table(fresh) == _group_table(c)
    assert [b.path for b in fresh.blocks] == [b.path for b in c.blocks]
    assert [b.params for b in fresh.blocks] == [b.params for b in c.blocks]


def _original_indices(pruned: ModelGraph, original: ModelGraph, param: str) -> tuple[str, list[np.ndarray]]:
    """For a parameter of ``pruned``: its original name and, per axis, the original index of each position."""
    orig_param = pruned.original_path(param)
    shape = pruned.state()[param].shape
    index = [np.full(n, -1) for n in shape]
    lineage = pruned.lineage
    for g in pruned.groups:
        if g.meta.get("overlaps"):
            continue  # head widths overlap their heads, which cover the same positions
        og = original.group(pruned.original_name(g.name))
        for j, unit in enumerate(g.units):
            src = og.units[int(lineage[g.name][j])]
            for (p, axis), idx in unit.items():
                if p == param:
                    index[axis][idx] = src[(orig_param, axis)]
    for axis, idx in enumerate(index):  # axes no group covers are never edited
        if (idx < 0).all():
            index[axis] = np.arange(shape[axis])
    return orig_param, index


def _assert_weights_follow_lineage(pruned: ModelGraph, original: ModelGraph) -> None:
    ostate = original.state()
    for name, t in pruned.state().items():
        if not t.is_floating_point():
            continue
        orig_name, index = _original_indices(pruned, original, name)
        assert all((i >= 0).all() for i in index), name
        expected = ostate[orig_name][np.ix_(*index)] if t.dim() else ostate[orig_name]
        torch.testing.assert_close(t, expected, atol=0, rtol=0, msg=name)


def test_lineage_composes_over_edits_and_survives_reload(tmp_path):
    original = fresh("bert")
    g = original.copy()
    # first edit: two heads of layer 0 and every other MLP unit of layer 1
    g.remove_many([("head:encoder.layer.0.attention", [0, 2]), ("mlp:encoder.layer.1", list(range(0, 128, 2)))])
    # second edit: more MLP units of layer 1 (indices now refer to the 64 left) and a residual-stream cut
    g.remove_many([("mlp:encoder.layer.1", [0, 1, 63]), ("embedding", [3, 10, 40])], force=True)
    lin = g.lineage
    assert lin["head:encoder.layer.0.attention"].tolist() == [1, 3]
    assert lin["mlp:encoder.layer.1"].tolist() == list(range(5, 126, 2))
    assert lin["embedding"].tolist() == [i for i in range(64) if i not in (3, 10, 40)]
    assert lin["mlp:encoder.layer.0"].tolist() == list(range(128))
    _assert_weights_follow_lineage(g, original)

    x = _inputs(g)
    out = g.forward(x)
    save(g, tmp_path / "saved")
    again = load_saved(tmp_path / "saved")
    torch.testing.assert_close(again.forward(x), out, atol=1e-6, rtol=1e-6)
    assert again.lineage_record() == g.lineage_record()
    assert {k: v.tolist() for k, v in again.lineage.items()} == {k: v.tolist() for k, v in lin.items()}
    _assert_weights_follow_lineage(again, original)


def test_block_deletion_renames_lineage_and_maps_back():
    original = fresh("bert")
    g = original.copy()
    g.remove("mlp:encoder.layer.1", [0, 5, 7])
    g.remove_block("encoder.layer.0")
    assert {k: v.tolist() for k, v in g.block_lineage.items()} == {"encoder.layer": [1]}
    # the former layer 1 is layer 0 now; its lineage and original name follow it
    assert g.original_name("mlp:encoder.layer.0") == "mlp:encoder.layer.1"
    assert g.lineage["mlp:encoder.layer.0"].tolist() == [i for i in range(128) if i not in (0, 5, 7)]
    assert set(g.lineage_record()["groups"]) <= {x.name for x in g.groups}
    _assert_weights_follow_lineage(g, original)


@pytest.mark.parametrize("family", ["bert", "vit", "fused", "resnet", "convnext"])
def test_permuting_every_group_is_exact_and_reloads(family, tmp_path):
    reference = fresh(family)
    g = reference.copy()
    rng = np.random.default_rng(7)
    orders = {}
    for grp in g.groups:
        if grp.prunable:
            orders[grp.name] = rng.permutation(grp.size)
            g.permute(grp.name, orders[grp.name], check=True)
    # heads, MLPs, conv channels and (where it is not the output) the residual stream
    assert EXPECTED_KINDS[family] <= {g.group(n).kind for n in orders}
    x = _inputs(g)
    torch.testing.assert_close(g.forward(x), reference.forward(x), atol=1e-5, rtol=1e-5)
    for name, order in orders.items():
        assert g.lineage[name].tolist() == order.tolist()

    save(g, tmp_path / "saved")
    again = load_saved(tmp_path / "saved")
    torch.testing.assert_close(again.forward(x), reference.forward(x), atol=1e-5, rtol=1e-5)
    for name, order in orders.items():
        assert again.lineage[name].tolist() == order.tolist()


def test_slice_keeps_listed_units_in_order():
    original = fresh("fused")
    g = original.copy()
    g.slice("mlp:blocks.0", [100, 3, 64, 7])
    g.slice("head:blocks.1.attn", [2, 0])
    assert g.lineage["mlp:blocks.0"].tolist() == [100, 3, 64, 7]
    assert g.lineage["head:blocks.1.attn"].tolist() == [2, 0]
    assert g.module.blocks[1].attn.num_heads == 2
    w = original.module.blocks[0].fc1.weight
    torch.testing.assert_close(g.module.blocks[0].fc1.weight, w[[100, 3, 64, 7]], atol=0, rtol=0)
    _assert_weights_follow_lineage(g, original)
    with pytest.raises(ValueError, match="distinct"):
        g.slice("mlp:blocks.1", [1, 1])


def test_check_verifies_exact_edits_and_undoes_inexact_ones():
    g = fresh("bert")
    state = g.state()
    with torch.no_grad():
        for u in (1, 2):  # zero MLP units 1 and 2 of layer 0: removing them is exact
            for (param, axis), idx in g.group("mlp:encoder.layer.0").units[u].items():
                state[param].index_fill_(axis, torch.as_tensor(idx), 0.0)
    g.remove("mlp:encoder.layer.0", [1, 2], check=True)
    assert g.group("mlp:encoder.layer.0").size == 126

    params, edits = g.num_parameters(), list(g.edits)
    x = _inputs(g)
    before = g.forward(x)
    with pytest.raises(ModelpressError, match="changed the outputs"):
        g.remove("head:encoder.layer.1.attention", [0], check=True)
    assert g.num_parameters() == params and g.edits == edits
    assert g.group("head:encoder.layer.1.attention").size == 4
    torch.testing.assert_close(g.forward(x), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="permutation"):
        g.permute("mlp:encoder.layer.1", [0, 0, 1])


def test_removing_blocks_at_once_equals_one_at_a_time():
    import transformers as T

    from modelpress.models.loaders import hf_input_spec

    torch.manual_seed(0)
    m = T.BertModel(T.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=64)).eval()
    original = ModelGraph(m, hf_input_spec(m), {"kind": "hf", "class": "BertModel", "config": m.config.to_dict()})
    paths = [b.path for b in original.blocks]
    assert len(paths) == 4
    at_once = original.copy()
    at_once.remove_blocks([paths[0], paths[2]])  # any order: later blocks go first
    one_by_one = original.copy()
    one_by_one.remove_block(paths[2])
    one_by_one.remove_block(paths[0])
    x = _inputs(at_once)
    torch.testing.assert_close(at_once.forward(x), one_by_one.forward(x), atol=0, rtol=0)
    assert {k: v.tolist() for k, v in at_once.block_lineage.items()} == {"encoder.layer": [1] + list(range(3, len(paths)))}
    assert at_once.module.config.num_hidden_layers == len(paths) - 2 == len(at_once.blocks)
    _assert_weights_follow_lineage(at_once, original)
    with pytest.raises(KeyError, match="not a removable block"):
        at_once.remove_blocks(["encoder.layer.9"])


def test_a_hook_registered_around_a_snapshot_and_restore_is_removed_by_its_handle():
    """The dry run snapshots and restores every module per trial; a hook put on a module before (a pass's
    probe, the mapped-weight drops around the dry run) must still go when its handle is removed."""
    from modelpress.graph import edit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    calls = []
    handle = model[0].register_forward_hook(lambda *_: calls.append(1))
    saved = edit.snapshot(model)
    model[0].weight = torch.nn.Parameter(torch.zeros(8, 4))
    edit.restore(saved)
    model(torch.ones(1, 4))
    assert calls == [1]
    handle.remove()
    model(torch.ones(1, 4))
    assert calls == [1], "the hook outlived its handle's removal"
