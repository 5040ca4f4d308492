"""The structures that crashed the graph (issue 18, items 1-3), on the small models of tests/graph/structures.py:
hierarchical stages with a lone block, expanded depthwise + squeeze-excitation blocks with BatchNorm, and one
per-head bias table shared by every layer. Graph facts first (seconds), then each model through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.cli import main
from modelpress.graph import InputSpec, ModelGraph
from modelpress.graph.edit import apply_edit
from modelpress.models import load
from tests.graph import structures

FACTORIES = {
    "one_block_stage": "tests.graph.structures:one_block_stage",
    "depthwise_se": "tests.graph.structures:depthwise_se",
    "shared_bias_encoder": "tests.graph.structures:shared_bias_encoder",
}


# ------------------------------------------------------------------ (a) a block alone in its container


def test_lone_residual_block_goes_by_an_identity():
    g = load(FACTORIES["one_block_stage"])
    removal = {b.path: b.removal for b in g.blocks}
    assert removal == {"stages.0.blocks.0": "delete", "stages.0.blocks.1": "delete", "stages.1.blocks.0": "identity"}
    x = g.example_inputs(2)
    shape = g.forward(x).shape
    g.remove_blocks(["stages.1.blocks.0"])
    assert isinstance(g.module.stages[1].blocks[0], nn.Identity) and len(g.module.stages[1].blocks) == 1
    assert g.forward(x).shape == shape
    assert [b.path for b in g.blocks] == ["stages.0.blocks.0", "stages.0.blocks.1"]
    rebuilt = structures.one_block_stage()  # the edit log replays on a fresh module (as reloading does)
    for e in g.edits:
        apply_edit(rebuilt, e)
    assert isinstance(rebuilt.stages[1].blocks[0], nn.Identity)


def test_inspect_says_how_a_lone_block_goes(capsys):
    main(["inspect", FACTORIES["one_block_stage"], "-q"])
    out = capsys.readouterr().out
    table = out[out.index("blocks alone in their container"):]
    assert "stages.1.blocks.0" in table and "identity" in table and "stages.0.blocks" not in table


def test_a_container_keeps_one_item_and_the_last_becomes_lone():
    g = load(FACTORIES["one_block_stage"])
    assert not g.can_remove_blocks(["stages.0.blocks.0", "stages.0.blocks.1"])
    assert g.can_remove_blocks(["stages.0.blocks.1", "stages.1.blocks.0"])
    g.remove_blocks(["stages.0.blocks.1"])
    assert {b.path: b.removal for b in g.blocks}["stages.0.blocks.0"] == "identity"  # now alone in its stage


class TupleBlock(nn.Module):
    """A residual block returning (hidden, extra), as many transformer layers do: an identity cannot stand in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + self.fc2(torch.relu(self.fc1(x))), x.mean()


class OneTupleLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TupleBlock()])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x, _ = layer(x)
        return self.head(x.mean(1))


def test_lone_block_that_an_identity_breaks_is_kept_and_not_a_candidate():
    torch.manual_seed(0)
    g = ModelGraph(OneTupleLayer().eval(), InputSpec("tensor", ["x"], shape=(4, 8)), name="tuple")
    assert [(b.path, b.removal, b.removable) for b in g.blocks] == [("layers.0", "none", False)]
    assert not g.can_remove_blocks(["layers.0"])
    from modelpress.errors import ModelpressError

    with pytest.raises(ModelpressError, match="cannot go together"):
        g.remove_blocks(["layers.0"])
    assert isinstance(g.module.layers[0], TupleBlock)
    assert g.summary()["blocks"][0]["removal"] == "none"  # what inspect shows


# ------------------------------------------------------------------ (b) the dry run puts the module back exactly


def _state(module: nn.Module) -> dict:
    """Every module's plain attributes, and every parameter and buffer (object, shape, values)."""
    out: dict = {}
    for name, m in module.named_modules():
        for k, v in m.__dict__.items():
            if not k.startswith("_"):
                out[f"{name}.{k}"] = repr(v)
        for k, t in [*m._parameters.items(), *m._buffers.items()]:
            out[f"{name}:{k}"] = None if t is None else (id(t), tuple(t.shape), t.detach().clone())
        out[f"{name}/"] = [(k, id(c)) for k, c in m._modules.items()]
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], tuple):
            assert a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]), k
        else:
            assert a[k] == b[k], k


class CountingSE(structures.SqueezeExcite):
    """Squeeze-excitation that reads its width from an attribute (so cutting it fails in the dry run) and counts
    its calls in a buffer written in place (as a BatchNorm in training mode writes its statistics)."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__(channels, squeezed)
        self.channels, self.widths = channels, [channels, squeezed]
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        s = x.mean((2, 3)).view(x.shape[0], self.channels, 1, 1)
        return x * torch.nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(s))))


def test_dry_run_restores_every_parameter_buffer_and_attribute():
    import copy

    from modelpress.graph.dryrun import failing_groups

    model = structures.depthwise_se()
    for block in model.blocks:
        block.se = CountingSE(block.se.reduce.in_channels, block.se.reduce.out_channels)
    g = ModelGraph(model.eval(), model.input_spec, name="counting")
    groups = copy.deepcopy(g.groups)
    tried = [x for x in groups if x.meta.pop("dry_run", None)]
    assert tried, "the squeeze-excitation widths must fail the dry run"
    for x in tried:
        x.prunable = True
    before = _state(g.module)
    run = g._runner()
    failed = failing_groups(g.module, groups, run, 0.3, tuple(run(g.module).shape))
    assert set(failed) == {x.name for x in tried}
    for block in g.module.blocks:
        block.se.calls.sub_(1)  # the one forward above, outside the dry run
    _assert_same(before, _state(g.module))


def test_depthwise_se_graph_leaves_batchnorm_consistent():
    g = load(FACTORIES["depthwise_se"])
    before = _state(g.module)
    assert any(x.prunable and x.kind == "conv" for x in g.groups)
    _assert_same(before, _state(g.module))
    g.summary()  # runs the model (MACs) as inspect does


# ------------------------------------------------------------------ (c) one per-head table for every layer


def test_shared_bias_table_makes_one_head_group_across_layers():
    g = load(FACTORIES["shared_bias_encoder"])
    heads = [x for x in g.groups if x.kind == "head"]
    assert len(heads) == 1 and heads[0].prunable and heads[0].size == 4
    slots = {p for p, _ in heads[0].slots}
    assert "layers.0.attn.relative_bias.weight" in slots
    assert all(f"layers.{i}.attn.q.weight" in slots for i in range(3))
    assert [b.get("heads") for b in g.summary()["blocks"]] == [4, 4, 4]
    x = g.example_inputs(2)
    shape = g.forward(x).shape
    g.remove(heads[0].name, [1, 2])
    assert [layer.attn.num_heads for layer in g.module.layers] == [2, 2, 2]
    assert g.module.layers[0].attn.relative_bias.weight.shape[1] == 2
    assert g.forward(x).shape == shape


# ------------------------------------------------------------------ each model through the CLI


def _data(kind: str, path) -> str:  # noqa: ANN001
    rng = np.random.default_rng(0)
    if kind == "shared_bias_encoder":
        arrays = {"x": rng.standard_normal((40, structures.TOKENS, structures.FEATURES)).astype(np.float32)}
    else:
        arrays = {"pixel_values": rng.random((40, *structures.IMAGE), dtype=np.float32)}
    np.savez(path, **arrays, labels=rng.integers(0, 5, 40))
    return f"tensors:{path}"


def _onnx_runs(folder, graph: ModelGraph) -> None:  # noqa: ANN001
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = graph.input_spec.make(3, seed=4)
    out = session.run(None, {i.name: batch[n] for i, n in zip(session.get_inputs(), graph.input_spec.names, strict=True)})
    assert out[0].shape == (3, 5)


@pytest.mark.slow
@pytest.mark.usefixtures("short_timing")
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_inspect_compress_and_prune_through_the_cli(kind, tmp_path, capsys):
    ckpt, data = FACTORIES[kind], _data(kind, tmp_path / "data.npz")
    main(["inspect", ckpt, "--json", "-q"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["blocks"]
    graph = load(ckpt)
    for args, folder in ((["compress", ckpt], tmp_path / "compressed"),
                         (["prune", ckpt, "--target-params", "0.6"], tmp_path / "pruned")):
        main([*args, "--data", data, "-o", str(folder), "--json", "-q"])
        report = json.loads(capsys.readouterr().out)
        _onnx_runs(folder, graph)
    ratio = report["after"]["parameters"] / report["before"]["parameters"]
    if kind == "shared_bias_encoder":
        assert ratio <= 0.6
    removed = [b for it in report["passes"][0]["iterations"] for b in it["removed_blocks"]]
    if kind == "one_block_stage":
        assert "stages.1.blocks.0" in removed  # the lone block the ranking picks first goes by an identity


# ------------------------------------------------------------------ an edit that fails half-way is undone


class FixedHeadCount(nn.Module):
    """Attention whose head count is a read-only property: setting it fails after the weights were sliced."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    @property
    def num_heads(self) -> int:
        return self.qkv.out_features // 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, 4).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(1, 2).reshape(b, n, -1))


def test_remove_many_undoes_an_edit_that_fails_half_way():
    from modelpress.errors import ModelpressError

    torch.manual_seed(0)
    g = ModelGraph(FixedHeadCount().eval(), InputSpec("tensor", ["x"], shape=(5, 16)), name="fixed_heads")
    head = next(x for x in g.groups if x.kind == "head")
    head.prunable, head.meta["fixed"] = True, False  # as if the dry run had not seen it
    before = _state(g.module)
    with pytest.raises(ModelpressError, match="the edit was undone"):
        g.remove(head.name, [0])
    _assert_same(before, _state(g.module))


def test_t5_heads_share_the_relative_bias_table(tmp_path):
    """The family that showed item 3: T5 computes the bias in layer 0 and passes it to sdpa in every layer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8)
    transformers.T5EncoderModel(config).eval().save_pretrained(tmp_path)
    g = load(f"hf:{tmp_path}")
    heads = [x for x in g.groups if x.kind == "head"]
    assert len(heads) == 1 and heads[0].prunable
    assert ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 1) in heads[0].slots
    width = next(x for x in g.groups if x.kind == "head_dim")
    assert width.prunable and width.meta["exact"]  # T5's head size attribute (key_value_proj_dim) follows the cut
    x = g.example_inputs(2, 8)
    shape = g.forward(x).shape
    g.remove_many([(heads[0].name, [1]), (width.name, [0, 5])])
    assert g.forward(x).shape == shape and g.module.config.num_heads == 3
    assert g.module.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape[1] == 3
