"""What pruning reads of a model's shape: widths after a head-width cut, and the one rounding rule."""

from __future__ import annotations

import pytest

from modelpress.bench.latency import graph_widths
from modelpress.graph import ModelGraph
from modelpress.prune.budget import round_keep, widths


@pytest.fixture(scope="module")
def vit(zoo_vit):  # noqa: ANN001, ANN201
    return ModelGraph(zoo_vit.module, zoo_vit.input_spec, name="digits-vit")


def test_widths_after_a_head_width_cut_are_the_attentions_own(vit) -> None:  # noqa: ANN001
    """Cut 5 of 16 dimensions of every head in block 0 and one head in block 1: the head dim both width
    readers give (prune's and the latency table's) is the size the attention reshapes by, and prune's
    prediction of the cut (``Widths.without``) is what the cut model reads."""
    dims = next(g for g in vit.groups if g.kind == "head_dim" and g.scope == "vit.layers.0.attention")
    heads = next(g for g in vit.groups if g.kind == "head" and g.scope == "vit.layers.1.attention")
    before = widths(vit)
    cut = vit.copy()
    cut.remove_many([(dims.name, [0, 3, 5, 8, 13]), (heads.name, [2])])
    after = widths(cut)
    assert after.blocks == before.without(dims, 5).without(heads, 1).blocks
    rows, embed = graph_widths(cut)
    assert embed == after.embedding == 64
    for row, (path, mine) in zip(rows, after.blocks.items(), strict=True):
        att = cut.module.get_submodule(path).attention
        assert row == mine == {"heads": att.num_attention_heads, "head_dim": att.head_dim, "mlp": 256}
        assert att.q_proj.out_features == att.num_attention_heads * att.head_dim
    assert (rows[0]["heads"], rows[0]["head_dim"], rows[1]["heads"], rows[1]["head_dim"]) == (4, 11, 3, 16)


def test_round_keep() -> None:
    assert round_keep(13, 64, 8) == 8  # down: at least the chosen units go
    assert round_keep(13, 64, 8, nearest=True) == 16  # a fixed ratio: the nearest multiple
    assert round_keep(3, 64, 8, floor=10) == 16  # the floor, rounded up to a multiple
    assert round_keep(2, 64, 8) == 8  # never below one multiple
    assert round_keep(70, 64, 8, nearest=True) == 64  # never above the group
    assert round_keep(3, 64, 1, floor=5) == 5 and round_keep(7, 64) == 7
