"""Runners: torch modules and ONNX files behind one callable, giving the same outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.data import ClassificationTask, load_data, onnx_runner, torch_runner
from modelpress.errors import ModelpressError
from modelpress.graph.inputs import InputSpec, PrimaryOutput

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.onnx.export(dynamo=False)


class _TinyText(nn.Module):
    """Takes input_ids and attention_mask by keyword, returns an HF-like dict with last_hidden_state."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.proj(self.emb(input_ids)) * attention_mask.unsqueeze(-1).float()
        return {"last_hidden_state": h}


class _Positional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.flatten(1)))


def _export(module: nn.Module, names: list[str], sample: dict, path, axes) -> None:  # noqa: ANN001
    wrapped = PrimaryOutput(module, names).eval()
    args = tuple(torch.from_numpy(sample[n]) for n in names)
    torch.onnx.export(
        wrapped,
        args,
        str(path),
        input_names=names,
        output_names=["output"],
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )


def test_torch_runner_positional_eval_mode_restored() -> None:
    module = _Positional().train()
    run = torch_runner(module, ["pixel_values"])
    x = {"pixel_values": np.random.default_rng(0).random((3, 1, 4, 4), dtype=np.float32)}
    a, b = run(x), run(x)
    np.testing.assert_array_equal(a, b)  # eval mode: dropout off
    assert a.shape == (3, 4) and a.dtype == np.float32
    assert module.training  # the caller's mode is restored


def test_torch_runner_keywords_and_int_casting() -> None:
    module = _TinyText()
    run = torch_runner(module, ["input_ids", "attention_mask"])
    batch = {
        "input_ids": np.arange(10, dtype=np.int32).reshape(2, 5),
        "attention_mask": np.ones((2, 5), np.int32),
        "token_type_ids": np.zeros((2, 5), np.int64),
    }  # extra keys are ignored
    out = run(batch)
    assert out.shape == (2, 5, 8)


def test_onnx_runner_matches_torch_text(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    module = _TinyText().eval()
    names = ["input_ids", "attention_mask"]
    spec = InputSpec(kind="text", names=names, vocab_size=50)
    path = tmp_path / "text.onnx"
    _export(module, names, spec.make(batch=2, seq_len=6), path, spec.dynamic_axes())
    batch = spec.make(batch=3, seq_len=9, seed=1)
    batch = {k: v.astype(np.int32) for k, v in batch.items()}  # ints are cast to the declared int64
    batch["unused"] = np.zeros(3)
    ort_out = onnx_runner(path, threads=1)(batch)
    np.testing.assert_allclose(ort_out, torch_runner(module, names)(batch), atol=1e-5)


def test_onnx_runner_matches_torch_on_zoo_cnn(tmp_path, zoo_cnn) -> None:  # noqa: ANN001
    names = zoo_cnn.input_spec.names
    path = tmp_path / "cnn.onnx"
    _export(zoo_cnn.module, names, zoo_cnn.input_spec.make(batch=2), path, zoo_cnn.input_spec.dynamic_axes())
    data = load_data("digits", zoo_cnn.input_spec, n_calibration=8, n_evaluation=64, batch_size=32)
    ort_run, torch_run = onnx_runner(path), torch_runner(zoo_cnn.module, names)
    for batch in data.evaluation.numpy_batches():
        np.testing.assert_allclose(ort_run(batch), torch_run(batch), atol=1e-4)
    task = ClassificationTask()
    m = task.evaluate(ort_run, torch_run, data.evaluation)
    assert m["agreement"] == 1.0 and m["accuracy"] >= 0.95


def test_onnx_runner_errors(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ModelpressError, match="not found"):
        onnx_runner(tmp_path / "missing.onnx")
    module = _Positional().eval()
    path = tmp_path / "p.onnx"
    _export(module, ["x"], {"x": np.zeros((1, 16), np.float32)}, path, {"x": {0: "batch"}})
    with pytest.raises(ModelpressError, match="lacks"):
        onnx_runner(path)({"y": np.zeros((1, 16), np.float32)})
