"""ONNX file helpers: sizes with external data and moves that carry the data along."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from modelpress.export import external_data_files, move_onnx, onnx_file_size


def _model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_size_and_move_with_external_data(tmp_path):
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    src = src_dir / "m.onnx"
    onnx.save_model(_model(), str(src), save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert [p.name for p in external_data_files(src)] == ["weights.bin"]
    assert onnx_file_size(src) == src.stat().st_size + (src_dir / "weights.bin").stat().st_size

    dst = move_onnx(src, dst_dir / "model.onnx")
    assert list(src_dir.iterdir()) == []  # the source and its data are gone
    assert dst.is_file() and [p.name for p in external_data_files(dst)] == ["model.onnx.data"]
    x = np.ones((2, 64), dtype=np.float32)
    y = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(
        y, x @ (np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096), rtol=1e-5
    )


def test_move_self_contained(tmp_path):
    src = tmp_path / "a.onnx"
    onnx.save_model(_model(), str(src))
    assert external_data_files(src) == []
    dst = move_onnx(src, tmp_path / "b.onnx")
    assert not src.exists() and onnx_file_size(dst) == dst.stat().st_size


def test_copy_keeps_the_external_data_and_the_source(tmp_path):
    """The CLI's output folder gets the model with its data file (named after the copy), the work copy untouched."""
    from modelpress.export.files import copy_onnx

    src = tmp_path / "a" / "work.onnx"
    src.parent.mkdir()
    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save_model(helper.make_model(graph), str(src), save_as_external_data=True, location="work.onnx.data",
                    size_threshold=0)
    out = tmp_path / "out"
    out.mkdir()
    dst = copy_onnx(src, out / "model.onnx")
    assert [p.name for p in external_data_files(dst)] == ["model.onnx.data"]
    assert (src.parent / "work.onnx.data").exists() and external_data_files(src)
    x = np.ones((1, 64), dtype=np.float32)
    y = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w, rtol=1e-5)
