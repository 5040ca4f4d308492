"""The search space on a hierarchical model: a block alone in its stage is skipped by an identity, and a
config never empties a stage (the extracted sub-network keeps one block of every stage and runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.search import SearchSpace, SuperNet
from tests.graph.structures import StagedNet


@pytest.fixture(scope="module")
def staged() -> ModelGraph:
    torch.manual_seed(0)
    model = StagedNet(depths=(2, 2, 1), widths=(8, 8, 16)).eval()
    return ModelGraph(model, model.input_spec, name="staged")


def test_skipping_everything_keeps_one_block_per_stage(staged):
    space = SearchSpace.from_graph(staged, precisions=("float",))
    assert [b.skippable for b in space.blocks] == [True] * 5
    assert [b.container for b in space.blocks] == ["stages.0.blocks"] * 2 + ["stages.1.blocks"] * 2 + [None]
    config = space.decode(np.zeros(space.n_genes, dtype=np.int64))  # every keep gene off
    assert [r["keep"] for r in config["blocks"]] == [False, True, False, True, False]
    sub = SuperNet(staged, space).extract(config)
    assert [type(m).__name__ for m in sub.module.stages[2].blocks] == ["Identity"]  # the lone block went
    assert [len(s.blocks) for s in sub.module.stages] == [1, 1, 1]
    out = sub.module(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_a_config_that_empties_a_stage_is_a_short_error(staged):
    space = SearchSpace.from_graph(staged, precisions=("float",))
    config = space.decode(space.bounds()[1])
    for row in config["blocks"][2:4]:
        row["keep"] = False
    with pytest.raises(ModelpressError, match="skips every block of stages.1.blocks"):
        space.check(config)


def test_the_sandwich_smallest_skips_blocks_where_the_space_allows(staged):
    """InstaTune's smallest sub-network: lowest widths and every skippable block skipped, one kept per stage."""
    space = SearchSpace.from_graph(staged, precisions=("float",))
    plain, skipping = space.smallest(), space.smallest(skip=True)
    assert all(r["keep"] for r in plain["blocks"])
    assert [r["keep"] for r in skipping["blocks"]] == [False, True, False, True, False]
    assert [{k: v for k, v in r.items() if k != "keep"} for r in skipping["blocks"]] == \
        [{k: v for k, v in r.items() if k != "keep"} for r in plain["blocks"]]
    space.check(skipping)
