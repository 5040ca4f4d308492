"""INT8 for convolutional networks (issue 19, item 2): after BatchNorm folding, the QDQ export of a ResNet
block runs every convolution on ONNX Runtime's integer kernels (no float Conv left between Q/DQ pairs), the
residual adds too, and its outputs match the torch model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.graph import InputSpec, ModelGraph
from modelpress.quantize.lowering import QDQ_MIN_COSINE, export_quantized
from modelpress.quantize.repq import RepQConfig, quantize_model

FAST = dict(act_observer="minmax", weight_observer="minmax", norm_observer="minmax", reconstruction="none",
            weight_reduce_range=True)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + identity)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(pixel_values)).mean((2, 3)))


def resnet_graph() -> ModelGraph:
    torch.manual_seed(0)
    model = TinyResNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return ModelGraph(model, InputSpec("image", ["pixel_values"], shape=(3, 32, 32)), name="tiny_resnet")


@pytest.fixture(scope="module")
def quantized():
    graph = resnet_graph()
    reference = graph.copy()
    assert len(graph.fold_norms()) == 6
    gen = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.rand(8, 3, 32, 32, generator=gen)} for _ in range(4)]
    quantize_model(graph.module, batches, [], RepQConfig(**FAST))
    ctx = SimpleNamespace(target=None, calibration=SimpleNamespace(batches=batches), reporter=_quiet())
    return graph, reference, ctx


def _quiet():
    from modelpress.progress import Reporter

    return Reporter(quiet=True)


def test_every_conv_and_residual_add_runs_on_integer_kernels(quantized, tmp_path: Path):
    graph, _, ctx = quantized
    out = export_quantized(graph, tmp_path / "q.onnx", ctx)
    assert out.placement["placement"] == "onnxruntime-qdq", out.placement
    assert out.placement["weights_overridden"] == 7  # 6 convs and the classifier: modelpress's codes
    kernels = out.kernels
    assert kernels.get("QLinearConv") == 6, kernels
    assert not {"Conv", "FusedConv", "BatchNormalization"} & set(kernels), kernels  # no float conv left
    assert kernels.get("QLinearAdd") == 2, kernels  # both residual adds
    assert out.verification["min_cosine"] >= QDQ_MIN_COSINE, out.verification


def test_the_export_matches_torch(quantized, tmp_path: Path):
    import onnxruntime as ort

    graph, reference, ctx = quantized
    export_quantized(graph, tmp_path / "q.onnx", ctx)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x.numpy()})[0]
    want = reference.forward({"pixel_values": x}).numpy()
    cos = (y * want).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99, cos
    assert (y.argmax(1) == want.argmax(1)).mean() >= 0.9


def test_weights_carry_modelpress_codes(quantized, tmp_path: Path):
    """The exported int8 weights are the torch model's codes (reconstructed on its grid), not ORT's own."""
    import onnx
    from onnx import numpy_helper

    graph, _, ctx = quantized
    export_quantized(graph, tmp_path / "q.onnx", ctx)
    m = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    layer = graph.module.get_submodule("layers.1.conv2")
    codes = layer.weight_quantizer.quant(layer.weight.detach()).numpy().astype(np.int8)
    exported = [v for k, v in inits.items() if v.dtype == np.int8 and v.shape == codes.shape]
    assert any(np.array_equal(v, codes) for v in exported)
    assert int(np.abs(codes).max()) <= 63  # 7-bit weights as configured, kept through ORT's quantizer


def test_the_placement_is_kept_when_its_extra_rounding_stays_within_its_check(quantized, tmp_path: Path, monkeypatch):
    """The placement quantizes tensors the torch simulation does not (conv outputs feeding an Add, the Add
    outputs): on depthwise-heavy nets it measures 0.97-0.99 against the simulation, which must not fail the
    run (ResNet-50 and MobileNetV2 did) nor push it back to the slow transformer form."""
    from modelpress.quantize import qdq
    from modelpress.quantize.lowering import PLACED_MIN_COSINE

    graph, _, ctx = quantized
    real = qdq.verify_qdq
    monkeypatch.setattr(qdq, "verify_qdq", lambda *a, **k: {**real(*a, **k), "min_cosine": 0.97})
    out = export_quantized(graph, tmp_path / "q.onnx", ctx)
    assert PLACED_MIN_COSINE < 0.97 and out.placement["placement"] == "onnxruntime-qdq"
    assert out.kernels.get("QLinearConv") == 6 and not out.float_fallback
