"""GPTQ for convolutions (im2col Hessian): each ungrouped convolution's reconstructed weights give a lower
output error than round-to-nearest on the calibration inputs, stay on the quantizer's grid, and a
depthwise convolution (grouped: no im2col form here) keeps its round-to-nearest weights."""

from __future__ import annotations

import torch
from torch import nn

from modelpress.quantize import QuantConfig, calibrate, wrap_model
from modelpress.quantize.reconstruct import reconstruct, rtn_errors


class ConvStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv2 = nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.dw(torch.relu(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def _output_error(layer: nn.Module, inputs: list[torch.Tensor], weight: torch.Tensor, reference: torch.Tensor) -> float:
    """||conv(x_q, weight) - conv(x_q, reference)||^2 over the calibration inputs, measured directly."""
    c = layer.conv
    total = 0.0
    for x in inputs:
        xq = layer.input_quantizer(x)
        diff = c._conv_forward(xq, weight, None) - c._conv_forward(xq, reference, None)
        total += float(diff.pow(2).sum())
    return total


def test_conv_gptq_beats_round_to_nearest_and_stays_on_the_grid():
    torch.manual_seed(0)
    model = ConvStack().eval()
    # smooth images (neighbouring pixels correlated, as in photos): the Hessian GPTQ exploits
    x = [nn.functional.interpolate(torch.randn(8, 3, 4, 4), size=12, mode="bilinear") + 0.05 * torch.randn(8, 3, 12, 12)
         for _ in range(3)]
    wrap_model(model, {"*": "w4a8"}, QuantConfig(attention=False))
    calibrate(model, x, observer="minmax")
    dw_before = model.dw.weight.detach().clone()
    inputs: dict[str, list[torch.Tensor]] = {"conv1": [], "conv2": []}
    hooks = [getattr(model, n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach()))
             for n in inputs]
    with torch.no_grad():
        for b in x:
            model(b)
    for h in hooks:
        h.remove()
    floats = {n: getattr(model, n).weight.detach().clone() for n in inputs}
    rtn = {n: getattr(model, n).weight_quantizer.fake_quant(floats[n]).detach() for n in inputs}
    before = rtn_errors(model, x)
    after = reconstruct(model, x, method="gptq")
    assert set(after) == {"conv1", "conv2", "fc"}  # the depthwise conv is left as it was
    for name in ("conv1", "conv2"):
        layer = getattr(model, name)
        assert after[name] < before[name], (name, before[name], after[name])
        gptq = _output_error(layer, inputs[name], layer.weight.detach(), floats[name])
        plain = _output_error(layer, inputs[name], rtn[name], floats[name])
        assert gptq < 0.9 * plain, (name, gptq, plain)  # measured on the real outputs, not GPTQ's own H
        assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)  # on the grid
    assert torch.equal(model.dw.weight, dw_before)
