"""Which original channels each pruned layer kept, read from the unit lineage: checked against the weights
themselves (before any refit, a pruned reader's weight is the original's at the mapped rows and columns)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.graph import ModelGraph
from modelpress.reconstruct import layer_map


@pytest.fixture(scope="module")
def vit(zoo_vit):  # noqa: ANN001
    return ModelGraph(zoo_vit.module, zoo_vit.input_spec, name="digits-vit")


def _check(original: ModelGraph, pruned: ModelGraph) -> dict:
    readers, skipped = layer_map(original, pruned)
    assert not skipped, skipped
    for name, m in readers.items():
        w = pruned.module.get_submodule(name).weight.detach()
        ow = original.module.get_submodule(m.original).weight.detach()
        assert torch.equal(w, ow[torch.as_tensor(m.outputs)][:, torch.as_tensor(m.inputs)]), name
    return readers


def _drop(graph: ModelGraph, name: str, share: float, seed: int) -> tuple[str, list[int]]:
    g = graph.group(name)
    rng = np.random.default_rng(seed)
    return name, sorted(rng.choice(g.size, int(g.size * share), replace=False).tolist())


def test_maps_of_overlapping_heads_widths_mlp_and_stream(vit) -> None:  # noqa: ANN001
    pruned = vit.copy()
    pruned.remove_many([_drop(pruned, n, s, i) for i, (n, s) in enumerate([
        ("head:vit.layers.0.attention", 0.5), ("head_dim:vit.layers.0.attention", 0.25),
        ("head_dim:vit.layers.1.attention", 0.5), ("mlp:vit.layers.2.mlp", 0.5), ("embedding", 0.25)])])
    readers = _check(vit, pruned)
    assert {"vit.layers.0.attention.o_proj", "vit.layers.1.attention.o_proj", "vit.layers.2.mlp.fc2",
            "vit.layers.3.attention.q_proj", "classifier"} <= set(readers)
    assert "vit.layers.3.mlp.fc2" not in readers  # reads all its hidden units; only its output rows went
    assert len(readers["vit.layers.0.attention.o_proj"].inputs) == 2 * 12


def test_maps_through_a_block_deletion_and_an_edited_input_graph(vit) -> None:  # noqa: ANN001
    start = vit.copy()
    start.remove_many([_drop(start, "mlp:vit.layers.3.mlp", 0.25, 0)])  # an earlier pass of a recipe
    pruned = start.copy()
    pruned.remove_blocks(["vit.layers.1"])
    pruned.remove_many([_drop(pruned, "mlp:vit.layers.2.mlp", 0.5, 1), _drop(pruned, "head:vit.layers.0.attention", 0.5, 2)])
    readers = _check(start, pruned)
    assert readers["vit.layers.2.mlp.fc2"].original == "vit.layers.3.mlp.fc2"  # renumbered after the deletion
    assert set(readers) == {"vit.layers.2.mlp.fc2", "vit.layers.0.attention.o_proj"}


def test_gpt2_conv1d_readers_are_mapped_refit_and_the_tied_head_is_left_alone() -> None:
    from modelpress.reconstruct import reconstruct_graph
    from modelpress.reconstruct.layers import input_axis
    from tests.graph.models_zoo import fresh, traced

    original, pruned = traced("gpt2"), fresh("gpt2")
    pruned.remove_many([(g.name, list(range(0, g.size, 4 if g.kind == "embedding" else 2))) for g in pruned.groups
                        if g.prunable and g.kind in ("mlp", "head", "embedding")])
    readers, skipped = layer_map(original, pruned)
    assert set(skipped) == {"lm_head"} and "tied" in skipped["lm_head"]
    assert "transformer.h.0.attn.c_attn" in readers and "transformer.h.1.mlp.c_proj" in readers
    for name, m in readers.items():
        mod = pruned.module.get_submodule(name)
        assert input_axis(mod) == 0  # Conv1D: [in, out]
        ow = original.module.get_submodule(m.original).weight.detach()
        assert torch.equal(mod.weight.detach(), ow[torch.as_tensor(m.inputs)][:, torch.as_tensor(m.outputs)])
    tied = pruned.module.lm_head.weight.detach().clone()
    result = reconstruct_graph(original, pruned, [original.example_inputs(4, 12, seed=s) for s in range(3)])
    assert set(result["layers"]) == set(readers)
    assert all(r["applied"] and r["error_after"] < r["error_before"] for r in result["layers"].values())
    assert torch.equal(pruned.module.lm_head.weight.detach(), tied)


def test_no_removal_no_reader_and_a_permutation_is_mapped_and_left_exact(vit) -> None:  # noqa: ANN001
    from modelpress.reconstruct import reconstruct_graph

    assert layer_map(vit, vit.copy()) == ({}, {})
    permuted = vit.copy()
    order = np.random.default_rng(0).permutation(permuted.group("mlp:vit.layers.1.mlp").size)
    permuted.permute("mlp:vit.layers.1.mlp", order)
    readers = _check(vit, permuted)
    assert set(readers) == {"vit.layers.1.mlp.fc2"}
    np.testing.assert_array_equal(readers["vit.layers.1.mlp.fc2"].inputs, order)
    before = {k: v.clone() for k, v in permuted.state().items()}
    batches = [{"pixel_values": torch.randn(16, 1, 8, 8)} for _ in range(2)]  # 544 rows for 257 unknowns
    result = reconstruct_graph(vit, permuted, batches)
    layer = result["layers"]["vit.layers.1.mlp.fc2"]
    assert not layer["applied"] and layer["error_before"] < 1e-10  # exact already: nothing to refit
    assert all(torch.equal(before[k], v) for k, v in permuted.state().items())


def test_scope_all_also_refits_the_layers_after_a_pruned_one_and_keeps_more_on_held_out_data(vit) -> None:  # noqa: ANN001
    """``scope="all"`` maps every refittable layer (those reading all their inputs with the identity map) and,
    refit in order on the drifted inputs, leaves the model closer to the original on held-out images than
    refitting only the readers of removed units."""
    from modelpress.reconstruct import reconstruct_graph

    pruned = vit.copy()
    pruned.remove_many([_drop(pruned, "mlp:vit.layers.0.mlp", 0.75, 0), _drop(pruned, "head:vit.layers.1.attention", 0.5, 1)])
    readers, _ = layer_map(vit, pruned)
    every, _ = layer_map(vit, pruned, every=True)
    assert set(readers) == {"vit.layers.0.mlp.fc2", "vit.layers.1.attention.o_proj"}
    assert set(readers) < set(every) and {"vit.layers.1.mlp.fc1", "vit.layers.3.attention.q_proj", "classifier"} <= set(every)
    np.testing.assert_array_equal(every["vit.layers.2.mlp.fc1"].inputs, np.arange(vit.module.get_submodule(
        "vit.layers.2.mlp.fc1").in_features))
    from modelpress.data import load_data

    data = load_data("digits", vit.input_spec, None, n_calibration=256, seed=0)
    calib = [{"pixel_values": b["pixel_values"]} for b in data.calibration.batches]
    held = torch.cat([torch.as_tensor(b["pixel_values"]) for b in data.evaluation.batches])
    with torch.no_grad():
        target = vit.module(pixel_values=held).logits
    errors = {}
    for scope in ("readers", "all"):
        graph = pruned.copy()
        result = reconstruct_graph(vit, graph, calib, scope=scope)
        assert set(result["layers"]) <= set(readers if scope == "readers" else every) and result["scope"] == scope
        with torch.no_grad():
            errors[scope] = float(((graph.module(pixel_values=held).logits - target) ** 2).mean())
    # measured: readers 0.054, all 0.043 (mean squared logit error on the 200 held-out digits)
    assert errors["all"] < 0.9 * errors["readers"], errors
