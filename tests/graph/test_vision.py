"""timm and torchvision models (the `vision` extra; CI runs these in a second environment)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vision


def _check(graph, tmp_path):
    from modelpress.export import export_onnx
    from modelpress.models import load_saved, save
    from tests.graph.test_families import _edit_everything

    assert graph.propagation.opaque_ops == []
    done = _edit_everything(graph)
    assert "block" in done and done & {"head", "mlp", "conv"}
    x = graph.example_inputs(2)
    out = graph.forward(x)
    save(graph, tmp_path / "saved")
    again = load_saved(tmp_path / "saved")
    torch.testing.assert_close(again.forward(x), out, atol=1e-5, rtol=1e-5)
    result = export_onnx(again.module, again.input_spec, tmp_path / "m.onnx", optimize="none")
    assert result.verification.ok
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x["pixel_values"].numpy()})[0]
    np.testing.assert_allclose(got, out.numpy(), atol=1e-3, rtol=1e-3)


def test_timm_vit_tiny(tmp_path):
    pytest.importorskip("timm")
    from modelpress.models import load

    g = load("timm:vit_tiny_patch16_224")
    heads = [x for x in g.groups if x.kind == "head"]
    assert len(heads) == 12 and all(h.size == 3 and h.unit_width() == 64 for h in heads)
    assert {x.kind for x in g.groups if x.prunable} >= {"head", "mlp", "embedding"}
    _check(g, tmp_path)


def test_torchvision_resnet18(tmp_path):
    pytest.importorskip("torchvision")
    from modelpress.models import load

    g = load("torchvision:resnet18")
    assert any(x.kind == "conv" and x.prunable for x in g.groups)
    assert len(g.blocks) >= 4
    _check(g, tmp_path)
