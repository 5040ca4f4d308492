"""Head-width groups (NViT head alignment): one dimension of every head of an attention, removed together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.models import load_saved, save
from tests.graph.models_zoo import fresh, traced

WITH_HEAD_DIMS = ["bert", "vit", "distilbert", "fused", "gpt2"]


def _zero(graph, group, units) -> None:  # noqa: ANN001
    params = dict(graph.module.named_parameters())
    with torch.no_grad():
        for u in units:
            for (p, axis), idx in group.units[u].items():
                if p in params:
                    params[p].index_fill_(axis, torch.as_tensor(idx), 0.0)


@pytest.mark.parametrize("family", WITH_HEAD_DIMS)
def test_removing_zeroed_head_dims_is_exact(family: str, tmp_path) -> None:  # noqa: ANN001
    g = fresh(family)
    dims = [x for x in g.groups if x.kind == "head_dim"]
    heads = {x.name: x for x in g.groups if x.kind == "head"}
    assert dims and all(d.meta["heads_group"] in heads for d in dims)
    for d in dims:
        assert d.size == heads[d.meta["heads_group"]].head_dim()
        assert "one head size" in d.meta["ties"]
    target = next(d for d in dims if d.prunable)
    if family == "fused":  # its attention computes head_dim ** -0.5 in forward: the cut rescales
        assert target.meta["exact"] is False and "scale" in target.meta["note"]
        return
    assert target.meta["exact"] is True
    cut = [0, 2, target.size - 1]
    _zero(g, target, cut)
    before = g.copy()
    g.remove(target.name, cut, check=True)  # raises if the outputs moved
    assert g.group(target.name).size == target.size - 3
    assert g.group(target.meta["heads_group"]).head_dim() == target.size - 3
    x = g.example_inputs(2)
    out = g.forward(x)
    torch.testing.assert_close(out, before.forward(x), atol=1e-5, rtol=1e-5)
    save(g, tmp_path / "saved")
    again = load_saved(tmp_path / "saved")
    torch.testing.assert_close(again.forward(x), out, atol=1e-6, rtol=1e-6)
    assert [x.size for x in again.groups if x.kind == "head_dim"] == [x.size for x in g.groups if x.kind == "head_dim"]


@pytest.mark.parametrize("family", ["bert", "fused"])
def test_head_dims_and_heads_combine_and_export(family: str, tmp_path) -> None:  # noqa: ANN001
    from modelpress.export import export_onnx

    g = fresh(family)
    rng = np.random.default_rng(0)
    for d in [x for x in g.groups if x.kind == "head_dim" and x.prunable]:
        g.remove(d.name, rng.choice(d.size, d.size // 2, replace=False))
    h = next(x for x in g.groups if x.kind == "head" and x.prunable)
    g.remove(h.name, [0])
    widths = g.summary()["blocks"]
    assert widths[0]["head_dim"] == traced(family).summary()["blocks"][0]["head_dim"] // 2
    result = export_onnx(g.module, g.input_spec, tmp_path / "m.onnx", optimize="none")
    assert result.verification.ok, result.verification.describe()


def test_rotary_models_keep_their_head_width() -> None:
    g = traced("llama")
    assert [x for x in g.groups if x.kind == "head"]
    assert not [x for x in g.groups if x.kind == "head_dim"]


@pytest.mark.parametrize("family", ["bert", "fused"])
def test_exactness_probe_edits_the_model_in_place_and_puts_it_back(family: str, monkeypatch) -> None:  # noqa: ANN001
    """Group discovery probes head-width exactness on the model itself (no copy of its weights: memory is
    part of the contract) and leaves every tensor, attribute and output as it was."""
    import copy

    from modelpress.graph import head_dims
    from tests.graph.models_zoo import build

    g = build(family)
    state = {k: v.detach().clone() for k, v in g.module.state_dict().items()}
    x = g.example_inputs(2, seed=4)
    out = g.forward(x)
    deep = copy.deepcopy

    def no_module_copies(value, memo=None):  # noqa: ANN001, ANN202
        assert not isinstance(value, torch.nn.Module), "the exactness probe copied the model"
        return deep(value, memo)

    probe = head_dims.check_exact

    def probed(graph, groups):  # noqa: ANN001, ANN202
        monkeypatch.setattr(copy, "deepcopy", no_module_copies)
        try:
            return probe(graph, groups)
        finally:
            monkeypatch.setattr(copy, "deepcopy", deep)

    monkeypatch.setattr(head_dims, "check_exact", probed)
    monkeypatch.setattr("modelpress.graph.model_graph.check_exact", probed, raising=False)
    dims = [d for d in g.groups if d.kind == "head_dim" and d.prunable]
    flags = [d.meta["exact"] for d in dims]
    assert flags == ([False, True] if family == "fused" else [True] * len(dims))  # as probed on a copy before
    after = g.module.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    torch.testing.assert_close(g.forward(x), out, atol=0, rtol=0)
