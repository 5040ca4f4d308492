"""Group discovery and edits across model families: runs, reloads, exports, and exact where it should be."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.models import load_saved, save
from tests.graph.models_zoo import fresh, traced

FAMILIES = ["bert", "vit", "distilbert", "resnet", "convnext", "fused"]
EXPECTED_KINDS = {
    "bert": {"head", "mlp"},
    "vit": {"head", "mlp", "embedding"},
    "distilbert": {"head", "mlp"},
    "resnet": {"conv"},
    "convnext": {"mlp", "embedding"},
    "fused": {"head", "mlp", "embedding"},
}


def _inputs(graph, seed: int = 3):
    return graph.example_inputs(2, 12 if graph.input_spec.kind == "text" else None, seed=seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_found(family):
    g = traced(family)  # discovered once per session; read only
    kinds = {grp.kind for grp in g.groups if grp.prunable}
    assert EXPECTED_KINDS[family] <= kinds, [grp.describe() for grp in g.groups]
    assert g.propagation.opaque_ops == []
    assert len(g.blocks) >= 2
    heads = [grp for grp in g.groups if grp.kind == "head"]
    for grp in heads:
        assert grp.size == 4 and grp.unit_width() == 16


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_zeroed_units_is_exact(family):
    """Units whose weights are zero contribute nothing: removing them must not change the output."""
    g = fresh(family)
    targets = [grp for grp in g.groups if grp.prunable and grp.kind in ("head", "mlp", "conv")]
    assert targets
    plan = []
    state = g.state()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for grp in targets:
            units = sorted(rng.choice(grp.size, size=max(1, grp.size // 4), replace=False).tolist())
            for u in units:
                for (param, axis), idx in grp.units[u].items():
                    state[param].index_fill_(axis, torch.as_tensor(idx), 0.0)
            plan.append((grp.name, units))
    x = _inputs(g)
    before = g.forward(x)
    for name, units in plan:
        g.remove(name, units)
    after = g.forward(x)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-4)


def _edit_everything(g):
    """Remove some units of every prunable kind, one embedding/residual family, and one block."""
    done = set()
    for kind in ("head", "mlp", "conv"):
        grp = next((x for x in g.groups if x.kind == kind and x.prunable), None)
        if grp is not None:
            g.remove(grp.name, [0, grp.size - 1] if kind != "head" else [1])
            done.add(kind)
    emb = next((x for x in g.groups if x.kind == "embedding" and not x.meta.get("fixed")), None)
    if emb is not None:
        g.remove(emb.name, list(range(0, emb.size, 8)), force=True)
        done.add("embedding")
    block = g.blocks[-1].path
    g.remove_block(block)
    done.add("block")
    return done


@pytest.mark.parametrize("family", FAMILIES)
def test_edited_model_runs_reloads_and_exports(family, tmp_path):
    from modelpress.export import export_onnx

    g = fresh(family)
    n_blocks = len(g.blocks)
    done = _edit_everything(g)
    assert "block" in done and done & {"head", "mlp", "conv"}
    assert len(g.blocks) == n_blocks - 1
    x = _inputs(g)
    out = g.forward(x)
    assert torch.isfinite(out).all()

    save(g, tmp_path / "saved")
    reloaded = load_saved(tmp_path / "saved")
    torch.testing.assert_close(reloaded.forward(x), out, atol=1e-6, rtol=1e-6)
    assert reloaded.summary()["blocks"] == g.summary()["blocks"]

    result = export_onnx(reloaded.module, reloaded.input_spec, tmp_path / "m.onnx", optimize="none")
    assert result.verification.ok
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: x[i.name].numpy() for i in sess.get_inputs()}
    np.testing.assert_allclose(sess.run(None, feed)[0], out.numpy(), atol=1e-4, rtol=1e-3)


def test_hf_config_tracks_nonuniform_widths():
    g = fresh("bert")
    g.remove("head:encoder.layer.0.attention", [0, 2])
    g.remove("mlp:encoder.layer.1", list(range(0, 128, 2)))
    cfg = g.module.config
    assert cfg.modelpress_widths == {"num_attention_heads": [2, 4], "intermediate_size": [128, 64]}
    assert g.module.encoder.layer[0].attention.self.num_attention_heads == 2
    assert g.module.encoder.layer[0].attention.self.all_head_size == 32
    g.remove_block("encoder.layer.1")
    assert cfg.num_hidden_layers == 1


def test_fused_qkv_heads_keep_attribute_consistent():
    g = fresh("fused")
    grp = g.group("head:blocks.0.attn")
    # a head spans q, k and v rows of the one fused Linear and the projection's columns
    unit = grp.units[0]
    assert len(unit[("blocks.0.attn.qkv.weight", 0)]) == 3 * 16
    assert len(unit[("blocks.0.attn.proj.weight", 1)]) == 16
    g.remove(grp, [2])
    assert g.module.blocks[0].attn.num_heads == 3
    assert g.module.blocks[0].attn.qkv.out_features == 3 * 3 * 16


def test_edit_errors():
    g = fresh("bert")
    with pytest.raises(ValueError, match="cannot be edited"):
        g.remove("embedding", [0])  # changes the output width: needs force=True
    with pytest.raises(ValueError, match="every unit"):
        g.remove("head:encoder.layer.0.attention", [0, 1, 2, 3])
    with pytest.raises(KeyError):
        g.remove_block("embeddings")


def test_minilm_inspect(minilm):
    s = minilm.summary()
    assert s["embedding_width"] == 384
    assert len(s["blocks"]) == 6
    assert all(b["heads"] == 12 and b["head_dim"] == 32 and b["mlp"] == 1536 for b in s["blocks"])
    assert s["parameters"] == 22_713_216
    assert s["macs"] > 1e9
