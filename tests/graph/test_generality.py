"""Graph generality (issue 12) on small hand-made modules: per-head tables, grouped convolutions, averaged
heads, dry-run fixing of groups that break the model, and remove_many's safety net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.graph.inputs import InputSpec
from modelpress.graph.model_graph import ModelGraph


class BiasedAttention(nn.Module):
    """Attention with a relative-position bias table [positions, heads] read through an index buffer."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 6) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        pos = torch.arange(tokens)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + tokens - 1).reshape(-1), persistent=False)
        self.tokens = tokens
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1)
        attn = (q * self.scale @ k.transpose(-2, -1) + bias.unsqueeze(0)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class TinyViT(nn.Module):
    """Tokens -> biased attention -> MLP -> two classifier heads whose logits are averaged."""

    def __init__(self, stack: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = BiasedAttention()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.head, self.head_dist = nn.Linear(32, 10), nn.Linear(32, 10)
        self.stack = stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(x)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        x = x.mean(1)
        a, b = self.head(x), self.head_dist(x)
        return torch.stack([a, b]).mean(0) if self.stack else (a + b) / 2


def _tokens_graph(model: nn.Module) -> ModelGraph:
    torch.manual_seed(0)
    return ModelGraph(model.eval(), InputSpec("tensor", ["x"], shape=(6, 8)), name=type(model).__name__)


@pytest.mark.parametrize("stack", [False, True])
def test_bias_table_joins_heads_and_averaged_heads_stay_whole(stack):
    torch.manual_seed(0)
    g = _tokens_graph(TinyViT(stack))
    heads = [x for x in g.groups if x.kind == "head"]
    assert len(heads) == 1 and heads[0].prunable and heads[0].size == 4
    assert ("attn.table", 1) in heads[0].slots  # the head axis of the table, through the index
    classes = [x for x in g.groups if ("head.weight", 0) in x.slots]
    assert len(classes) == 1 and ("head_dist.weight", 0) in classes[0].slots
    assert not classes[0].prunable and classes[0].meta["at_output"]
    x = g.example_inputs(2)
    before = g.forward(x)
    g.remove_many([(x_.name, [0, 2]) for x_ in g.groups if x_.prunable])
    assert g.module.attn.num_heads == 2 and g.module.attn.table.shape == (11, 2)
    assert g.forward(x).shape == before.shape


class GroupedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)  # 4 in, 8 out per group
        self.dw = nn.Conv2d(32, 64, 3, padding=1, groups=32)  # depthwise, channel multiplier 2
        self.pw = nn.Conv2d(64, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.pw(torch.relu(self.dw(torch.relu(self.grouped(x)))))
        return self.fc(x.mean((2, 3)))


def test_grouped_and_depthwise_convs_lose_whole_groups():
    """A unit of a grouped conv is one whole group: its input channels (the stem's), its output rows and
    the depthwise rows that read them (channel multiplier 2)."""
    torch.manual_seed(0)
    g = ModelGraph(GroupedConvs().eval(), InputSpec("image", ["pixel_values"], shape=(3, 12, 12)), name="gc")
    grp = next(x for x in g.groups if ("grouped.weight", 0) in x.slots)
    assert grp.prunable and grp.size == 4 and ("stem.weight", 0) in grp.slots and ("dw.weight", 0) in grp.slots
    unit = grp.units[1]
    assert [len(unit[(p, 0)]) for p in ("stem.weight", "grouped.weight", "dw.weight")] == [4, 8, 16]
    assert list(unit[("stem.weight", 0)]) == [4, 5, 6, 7]
    x = g.example_inputs(2)
    before = g.forward(x)
    g.remove(grp.name, [1, 3])
    m = g.module
    assert (m.grouped.groups, m.grouped.in_channels, m.grouped.out_channels) == (2, 8, 16)
    assert (m.dw.groups, m.dw.in_channels, m.dw.out_channels) == (16, 16, 32)
    assert g.forward(x).shape == before.shape


class StoredWidth(nn.Module):
    """Reshapes with a width stored at init that no adapter knows: cutting its channels breaks the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.frozen_width = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)).reshape(x.shape[0], 2, self.frozen_width // 2)
        return self.c(torch.relu(self.b(h.flatten(1))))


def test_dry_run_fixes_a_group_that_breaks_the_model_with_its_reason():
    torch.manual_seed(0)
    g = ModelGraph(StoredWidth().eval(), InputSpec("tensor", ["x"], shape=(8,)), name="stored")
    broken = next(x for x in g.groups if ("a.weight", 0) in x.slots)
    fine = next(x for x in g.groups if ("b.weight", 0) in x.slots)
    assert not broken.prunable and broken.meta["fixed"]
    assert "RuntimeError" in broken.reason and "breaks the model" in broken.reason
    assert fine.prunable
    with pytest.raises(ValueError, match="cannot be edited"):
        g.remove(broken.name, [0], force=True)
    g.remove(fine.name, [0, 1])
    assert g.forward(g.example_inputs(2)).shape == (2, 4)


def test_remove_many_undoes_an_edit_that_breaks_the_model():
    torch.manual_seed(0)
    g = ModelGraph(StoredWidth().eval(), InputSpec("tensor", ["x"], shape=(8,)), name="stored")
    broken = next(x for x in g.groups if ("a.weight", 0) in x.slots)
    broken.prunable, broken.meta["fixed"], broken.reason = True, False, ""  # as if the dry run had missed it
    fine = next(x for x in g.groups if ("b.weight", 0) in x.slots)
    x = g.example_inputs(2)
    before = g.forward(x)
    params, edits = g.num_parameters(), list(g.edits)
    with pytest.raises(ModelpressError, match=broken.name):
        g.remove_many([(fine.name, [0]), (broken.name, [0])])
    assert g.num_parameters() == params and g.edits == edits
    torch.testing.assert_close(g.forward(x), before)
    g.remove(fine.name, [0])  # the graph is still usable
    assert g.forward(x).shape == before.shape
