"""export_onnx and verify_onnx: correctness against torch, dynamic axes, atomic writes, errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from modelpress.bench import candidate_timer
from modelpress.errors import ModelpressError
from modelpress.export import ExportResult, export_onnx, onnx_file_size, verify_onnx
from modelpress.graph.inputs import InputSpec, PrimaryOutput


def _ort_vs_torch(path, module, spec: InputSpec, batch: int, seq: int | None) -> tuple[float, float]:
    feed = spec.make(batch, seq, seed=7)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feed)[0]
    with torch.inference_mode():
        ref = PrimaryOutput(module, spec.names)(*(torch.from_numpy(feed[n]) for n in spec.names)).numpy()
    assert got.shape == ref.shape
    g, r = got.reshape(batch, -1).astype(np.float64), ref.reshape(batch, -1).astype(np.float64)
    cos = np.sum(g * r, 1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1))
    return float(np.abs(got - ref).max()), float(cos.min())


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_minilm_export_verifies_with_dynamic_batch_and_sequence(minilm_hf, tmp_path):
    model, spec = minilm_hf
    before = model.config._attn_implementation
    path = tmp_path / "model.onnx"
    result = export_onnx(model, spec, path, optimize="none")

    assert isinstance(result, ExportResult)
    assert result.path == path and path.is_file()
    assert _leftovers(tmp_path) == ["model.onnx"]  # no temporary files left behind
    onnx.checker.check_model(str(path))
    assert result.optimization == "none"
    assert result.verification is not None and result.verification.ok
    assert result.verification.max_abs_err < 1e-4
    assert result.verification.cosine > 0.99999
    assert result.file_size_bytes == onnx_file_size(path) == path.stat().st_size
    assert result.export_seconds > 0
    assert result.attn_implementation == "eager" and result.model_type == "bert"
    assert model.config._attn_implementation == before  # the switch to eager is undone

    graph = onnx.load(str(path), load_external_data=False).graph
    assert [o.name for o in graph.output] == ["output"]
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]

    err, cos = _ort_vs_torch(path, model, spec, batch=3, seq=17)
    assert err < 1e-4 and cos > 0.99999


def test_failing_forward_raises_and_leaves_no_file(tmp_path):
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    path = tmp_path / "model.onnx"
    with pytest.raises(ModelpressError, match="export failed"):
        export_onnx(Broken(), InputSpec("tensor", ["x"], shape=(4,)), path, optimize="none")
    assert _leftovers(tmp_path) == []


def test_failed_export_keeps_an_existing_file(tmp_path):
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("nope")

    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ModelpressError):
        export_onnx(Broken(), InputSpec("tensor", ["x"], shape=(4,)), path, optimize="none")
    assert path.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == ["model.onnx"]


def test_verify_onnx_detects_a_different_model(tmp_path):
    spec = InputSpec("tensor", ["x"], shape=(8,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    path = tmp_path / "mlp.onnx"
    export_onnx(model, spec, path, optimize="none")

    same = verify_onnx(path, model, spec)
    assert same.ok and same.max_abs_err < 1e-5

    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    wrong = verify_onnx(path, other, spec)
    assert not wrong.ok
    assert wrong.max_abs_err > 1e-2
    # Tolerances are the caller's: loose enough, even this passes.
    assert verify_onnx(path, other, spec, atol=100.0, min_cosine=-1.0).ok


def test_verify_onnx_relative_tolerance_for_large_outputs(tmp_path):
    """Outputs in the thousands: float32 rounding alone exceeds a fixed atol; the default rtol scales with the
    output, so a matching export is not refused."""
    spec = InputSpec("tensor", ["x"], shape=(8,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[2].weight.mul_(1e4)
    path = tmp_path / "large.onnx"
    export_onnx(model, spec, path, optimize="none", verify=False)
    with torch.no_grad():
        model[2].weight.mul_(1 + 1e-5)  # the torch reference drifts by 1e-5 of its magnitude

    strict = verify_onnx(path, model, spec, rtol=0.0)
    assert not strict.ok and strict.max_abs_err > 1e-3  # an absolute check refuses a matching output
    assert strict.reference_max > 1e3 and strict.relative_error < 1e-4
    relative = verify_onnx(path, model, spec)  # the default scales with the output (DEFAULT_RTOL)
    assert relative.ok and relative.max_abs_err == strict.max_abs_err and relative.rtol == 1e-4
    assert "max|ref|" in relative.describe()
    assert not verify_onnx(path, model, spec, rtol=1e-7).ok  # rtol too small still fails


def test_export_raises_when_verification_fails(tmp_path, monkeypatch):
    spec = InputSpec("tensor", ["x"], shape=(8,))
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    path = tmp_path / "m.onnx"
    # An impossible tolerance makes the verification fail: the export must refuse and write nothing.
    with pytest.raises(ModelpressError, match="does not match torch"):
        export_onnx(model, spec, path, optimize="none", atol=-1.0)
    assert _leftovers(tmp_path) == []
    # verify=False skips the check.
    result = export_onnx(model, spec, path, optimize="none", atol=-1.0, verify=False)
    assert result.verification is None and path.is_file()


def test_conv_model_export(conv_model, tmp_path):
    model, spec = conv_model
    path = tmp_path / "conv.onnx"
    result = export_onnx(model, spec, path, optimize="ort")
    assert result.optimization == "ort" and result.verification.ok
    assert result.attn_implementation is None and result.model_type is None
    err, cos = _ort_vs_torch(path, model, spec, batch=5, seq=None)
    assert err < 1e-4 and cos > 0.9999


def test_small_vit_export(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    spec = InputSpec("image", ["pixel_values"], shape=(3, 16, 16))
    path = tmp_path / "vit.onnx"
    result = export_onnx(model, spec, path, optimize="none")
    assert result.verification.ok and result.model_type == "vit"
    err, cos = _ort_vs_torch(path, model, spec, batch=3, seq=None)
    assert err < 1e-4 and cos > 0.9999


def test_auto_picks_a_verified_candidate(tiny_bert, tmp_path):
    model, spec = tiny_bert
    path = tmp_path / "bert.onnx"
    result = export_onnx(model, spec, path, optimize="auto", timer=candidate_timer("ort-cpu", rounds=2))
    assert set(result.candidates) >= {"none", "ort", "transformer"}
    assert result.optimization in result.candidates
    chosen = result.candidates[result.optimization]
    assert chosen.verified and chosen.median_ms is not None and chosen.median_ms > 0
    for cand in result.candidates.values():
        assert cand.error is not None or cand.verified is not None
        if cand.verified:
            assert cand.median_ms > 0 and cand.speedup > 0
    assert result.candidates["none"].speedup == pytest.approx(1.0)
    assert result.timing["batch"] == 1 and result.timing["seq_len"] == 32
    assert _leftovers(tmp_path) == ["bert.onnx"]
    assert result.to_dict()["path"] == str(path)
    err, cos = _ort_vs_torch(path, model, spec, batch=3, seq=17)
    assert err < 1e-4 and cos > 0.9999


def test_option_errors(conv_model, tmp_path):
    model, spec = conv_model
    with pytest.raises(ModelpressError, match="unknown optimization"):
        export_onnx(model, spec, tmp_path / "a.onnx", optimize="fastest")
    with pytest.raises(ModelpressError, match="model type"):
        export_onnx(model, spec, tmp_path / "b.onnx", optimize="transformer")
    assert _leftovers(tmp_path) == []


def test_model_that_cannot_switch_attention_is_exported_as_is(tiny_bert, tmp_path, monkeypatch):
    model, spec = tiny_bert
    original = model.config._attn_implementation

    def refuse(self, implementation):  # noqa: ANN001
        raise ValueError("cannot switch")

    monkeypatch.setattr(type(model), "set_attn_implementation", refuse)
    result = export_onnx(model, spec, tmp_path / "m.onnx", optimize="none")
    assert result.attn_implementation == original and result.verification.ok
    assert model.config._attn_implementation == original
