"""Export candidates built in a child process (what a large model's export does): the same model as built in this
process, its tensors in external data, the child's peak reported, a failing child named in a short error."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

from modelpress.errors import ModelpressError
from modelpress.export import builders, export_onnx


def _ops_and_weights(path) -> tuple[list[str], dict[str, tuple]]:  # noqa: ANN001
    model = onnx.load(str(path))
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [n.op_type for n in model.graph.node], {k: (a.dtype.str, a.shape, a.tobytes()) for k, a in arrays.items()}


@pytest.mark.parametrize("name", builders.BUILDERS)
def test_a_candidate_built_in_a_child_equals_one_built_here(tiny_bert, tmp_path, name) -> None:  # noqa: ANN001
    """Each builder writes a large model's tensors to external data itself (the same graph and weights)."""
    model, spec = tiny_bert
    plain = tmp_path / "plain.onnx"
    export_onnx(model, spec, plain, optimize="none")
    options = {"model_type": "bert", "heads": [4, 4], "sizes": [8, 8]}
    here, child = tmp_path / "here.onnx", tmp_path / "child.onnx"
    assert builders.build_candidate(name, plain, here, isolated=False, **options) is None
    ballast = b"\1" * 2**30  # this process holds 1 GiB: the child's own peak must not include it
    peak = builders.build_candidate(name, plain, child, isolated=True, **options)
    del ballast
    assert peak is not None and 10 * 2**20 < peak < 800 * 2**20  # the child's own resident set
    assert (tmp_path / "child.onnx.data").is_file() and not (tmp_path / "here.onnx.data").exists()  # large: external
    assert (tmp_path / "child.onnx").stat().st_size < 0.2 * (tmp_path / "here.onnx").stat().st_size
    ops, weights = _ops_and_weights(child)
    if name == "transformer":
        assert "Attention" in ops  # the fusion ran
    assert (ops, weights) == _ops_and_weights(here)


def test_export_builds_large_models_candidates_in_a_child(tiny_bert, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    model, spec = tiny_bert
    monkeypatch.setattr(builders, "OUT_OF_PROCESS_MIN_BYTES", 0)  # every model counts as large
    result = export_onnx(model, spec, tmp_path / "bert.onnx", optimize="transformer")
    assert result.candidates["transformer"].build_process_peak_bytes > 0
    assert result.verification.ok and result.to_dict()["candidates"]["transformer"]["build_process_peak_bytes"] > 0


def test_a_failing_child_is_a_short_error(tmp_path) -> None:  # noqa: ANN001
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelpressError, match="'onnxslim' candidate failed in its own process: .+") as err:
        builders.build_candidate("onnxslim", bad, tmp_path / "out.onnx", isolated=True)
    assert "Traceback" not in str(err.value) and len(str(err.value).splitlines()) <= 2
    assert not (tmp_path / "out.onnx").exists()


def test_the_child_needs_no_torch() -> None:
    code = "import sys, modelpress.export.builders; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_auto_leaves_onnxslim_out_for_a_large_model(tiny_bert, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """onnxslim loads the whole model (8.3x BERT-base at its peak): a large export's ``auto`` does not build it,
    ONNX Runtime's candidates (tensors on disk) are built."""
    from modelpress.export import onnx as export_module

    model, spec = tiny_bert
    monkeypatch.setattr(builders, "OUT_OF_PROCESS_MIN_BYTES", 0)
    monkeypatch.setattr(export_module, "OUT_OF_PROCESS_MIN_BYTES", 0)
    result = export_onnx(model, spec, tmp_path / "bert.onnx", optimize="auto")
    assert "onnxslim" not in result.candidates and {"none", "ort", "transformer"} <= set(result.candidates)
    monkeypatch.setattr(export_module, "OUT_OF_PROCESS_MIN_BYTES", 1 << 40)  # a small model: built
    assert "onnxslim" in export_onnx(model, spec, tmp_path / "small.onnx", optimize="auto").candidates
