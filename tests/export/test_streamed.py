"""The streamed export (``export.streamed``): the weights written from the live tensors into external data,
the linear weights folded into transposed initializers as torch's constant folding would, the same outputs as
the self-contained export, and the file pair moved as one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import modelpress.export.onnx as export_onnx_module
from modelpress.export import export_onnx
from modelpress.export.files import external_data_files, move_onnx
from modelpress.targets import cpu_session


def _run(path, feeds):  # noqa: ANN001, ANN202
    return cpu_session(path, threads=1).run(None, feeds)[0]


def test_streamed_export_matches_the_self_contained_one_and_moves_as_a_pair(minilm_hf, tmp_path, monkeypatch):
    module, spec = minilm_hf
    plain = export_onnx(module, spec, tmp_path / "plain.onnx", optimize="none")
    monkeypatch.setattr(export_onnx_module, "STREAM_MIN_BYTES", 0)  # MiniLM (91 MB) is streamed too
    streamed = export_onnx(module, spec, tmp_path / "a" / "streamed.onnx", optimize="none")
    assert streamed.verification.ok
    assert not external_data_files(plain.path)
    assert [p.name for p in external_data_files(streamed.path)] == ["streamed.onnx.data"]

    model = onnx.load(str(streamed.path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    assert not [i.name for i in model.graph.input if i.name in weights]  # weights are initializers, not inputs
    # every Linear weight folded into a transposed initializer, as the folded export has it
    assert not [n.name for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in weights]
    matmuls = sum(n.op_type == "MatMul" for n in model.graph.node)
    assert matmuls == sum(n.op_type == "MatMul" for n in onnx.load(str(plain.path)).graph.node)

    feeds = spec.make(2, 21, seed=3)
    expected = _run(plain.path, feeds)
    np.testing.assert_allclose(_run(streamed.path, feeds), expected, atol=1e-5)
    moved = move_onnx(streamed.path, tmp_path / "b" / "model.onnx") if (tmp_path / "b").mkdir() is None else None
    assert [p.name for p in external_data_files(moved)] == ["model.onnx.data"]
    assert not (tmp_path / "a" / "streamed.onnx.data").exists() and not streamed.path.exists()
    np.testing.assert_allclose(_run(moved, feeds), expected, atol=1e-5)


def test_a_tensor_the_graph_cannot_name_is_refused(tmp_path):
    import torch

    from modelpress.errors import ModelpressError
    from modelpress.export.streamed import export_streamed

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.lin(x)

    m = Scaled()
    out = tmp_path / "m.onnx"
    export_streamed(m, (torch.ones(1, 4),), out, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False,
                    dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_run(out, {"x": x}), m(torch.from_numpy(x)).numpy(), atol=1e-6)
    with pytest.raises(ModelpressError, match="not the model's tensors"):
        export_streamed(m, (torch.ones(1, 4),), tmp_path / "n.onnx", input_names=[], output_names=["y"],
                        opset_version=17, dynamo=False)


def test_a_candidate_that_would_not_fit_in_memory_is_skipped_or_refused(minilm_hf, tmp_path, monkeypatch):
    from modelpress.errors import ModelpressError

    module, spec = minilm_hf
    monkeypatch.setattr(export_onnx_module, "available_memory", lambda: 2**28)  # 256 MiB left: onnxslim needs ~0.7 GiB
    res = export_onnx(module, spec, tmp_path / "auto.onnx", optimize="auto")
    assert res.optimization == "none"
    for name in ("transformer", "onnxslim"):
        if name in res.candidates:
            assert "GiB is available" in (res.candidates[name].error or ""), res.candidates[name]
    with pytest.raises(ModelpressError, match="needs about"):
        export_onnx(module, spec, tmp_path / "forced.onnx", optimize="transformer")
    assert not (tmp_path / "forced.onnx").exists()


def _graph(path) -> bytes:  # noqa: ANN001 - the graph without its data file's name
    g = onnx.load(str(path), load_external_data=False).graph
    for t in g.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "data"
    return g.SerializeToString()


@pytest.mark.parametrize("form", ["float", "qdq"])
def test_skipping_the_whole_graph_shape_inference_gives_the_same_graph(minilm_hf, tmp_path, monkeypatch, form):
    """The QDQ export and the INT8 check's float twin skip torch's whole-graph shape inference (it copies every
    weight, all resident at once): the pass is really skipped, and the graph is the one it gives."""
    import contextlib

    import torch

    import modelpress.export.streamed as streamed_module
    from modelpress.graph import ModelGraph
    from modelpress.quantize.placement import export_float
    from modelpress.quantize.qdq import export_examples, export_qdq

    module, spec = minilm_hf
    calls = []
    original = torch._C._jit_pass_onnx_graph_shape_type_inference

    def counted(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", counted)
    monkeypatch.setattr(streamed_module, "STREAM_MIN_BYTES", 0)
    graph = ModelGraph(module, spec)
    if form == "qdq":
        import copy

        from modelpress.quantize.repq import RepQConfig, quantize_model

        graph = ModelGraph(copy.deepcopy(module), spec)
        fast = RepQConfig(act_observer="minmax", weight_observer="minmax", norm_observer="minmax")
        quantize_model(graph.module, [graph.example_inputs(2, 16)], graph.norm_consumers(), fast)
    for folder in ("without", "with"):
        if folder == "with":  # the pass as torch runs it
            monkeypatch.setattr(streamed_module, "_without_whole_graph_shape_inference",
                                lambda _skip: contextlib.nullcontext())
        path = tmp_path / folder / "m.onnx"
        path.parent.mkdir()
        if form == "qdq":
            example, _ = export_examples(graph)
            export_qdq(graph.module, example, path, input_names=spec.names, dynamic_axes=spec.dynamic_axes(),
                       stream=True)
        else:
            export_float(graph.module, graph.example_inputs(2, 16), path, spec.names, spec.dynamic_axes(), stream=True)
        if folder == "without":
            assert not calls  # skipped
    assert calls  # run by torch otherwise
    assert _graph(tmp_path / "with" / "m.onnx") == _graph(tmp_path / "without" / "m.onnx")
