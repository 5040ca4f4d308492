"""Per-channel input scales at Linear inputs (channel_sites.py): exact reparameterization, the automatic
choice, and the QDQ export keeping integer kernels."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from modelpress.quantize.channel_sites import apply_floor, candidates, choose_sites
from modelpress.quantize.fakequant import QuantConfig, calibrate, set_quant_state, wrap_model
from modelpress.quantize.qdq import export_qdq, integer_kernel_count, ort_kernels, verify_qdq
from modelpress.quantize.quantizers import UniformQuantizer
from modelpress.quantize.reparam import reparameterize
from modelpress.quantize.repq import RepQConfig, quantize_model
from tests.quantize.test_export_qdq import FAST, _pairs
from tests.quantize.test_fakequant import text_batches, tiny_bert


class UnevenMLP(nn.Module):
    """fc1 -> GELU -> fc2 where fc2's input channels differ in range by ~1000x (like BERT's MLP), and a
    second branch whose input channels are even (per-channel scales gain nothing there)."""

    def __init__(self, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.even = nn.Linear(dim, dim)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # every hidden channel matters equally to the output, whatever its range
            spread = torch.logspace(-1.5, 1.5, hidden)[torch.randperm(hidden, generator=g)]
            self.fc1.weight.mul_(spread[:, None])
            self.fc1.bias.mul_(spread)
            self.fc2.weight.div_(spread[None, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x))) + self.even(x)


def _calib(n: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 10, 16, generator=g, dtype=dtype) for _ in range(n)]


def _activation_only(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    set_quant_state(model, weights=False, activations=True)
    with torch.no_grad():
        out = model(x)
    set_quant_state(model, weights=True, activations=True)
    return out


def test_named_site_is_reparameterized_exactly():
    torch.manual_seed(0)
    model = UnevenMLP().double()
    calib = _calib(dtype=torch.float64)
    wrap_model(model, None, QuantConfig(attention=False))
    calibrate(model, calib, observer="minmax")
    groups, report = choose_sites(model, calib, patterns=["fc2"], floor=0.0)
    assert report["sites"] == ["fc2"] and groups[0].quantizer.scale.numel() == 64
    x = _calib(1, seed=9, dtype=torch.float64)[0]
    fc2 = model.fc2
    per_channel = copy.deepcopy(model)
    out_ref = _activation_only(per_channel, x)
    hidden = nn.functional.gelu(per_channel.fc1(x))
    codes_ref = per_channel.fc2.input_quantizer.quant(hidden)

    reparameterize(model, groups, check_batch=calib[0], mode="fold")  # no norm: consumer side regardless
    assert groups[0].mode == "affine" and fc2.input_quantizer.scale.dim() == 0
    codes = fc2.input_quantizer.quant(fc2.prepare_input(nn.functional.gelu(model.fc1(x))))
    assert torch.equal(codes, codes_ref)
    torch.testing.assert_close(_activation_only(model, x), out_ref, rtol=1e-5, atol=1e-6)


def test_floor_widens_quiet_channels_only():
    q = UniformQuantizer(8, symmetric=False, axis=-1)
    q.set_range(torch.tensor([-0.1, -0.1, -1.0]), torch.tensor([0.1, 10.0, 1.0]))
    before = q.scale.clone()
    apply_floor(q, 0.25)
    per_tensor = (10.0 + 1.0) / 255
    assert torch.allclose(q.scale[1], before[1])  # the widest channel keeps its scale
    assert q.scale[0] >= 0.99 * 0.25 * per_tensor and q.scale[0] > before[0]
    lo, hi = (q.qmin - q.zero_point) * q.scale, (q.qmax - q.zero_point) * q.scale
    half = q.scale / 2 + 1e-6  # the zero point rounds to an integer: bounds move by at most half a step
    assert (lo <= torch.tensor([-0.1, -0.1, -1.0]) + half).all()
    assert (hi >= torch.tensor([0.1, 10.0, 1.0]) - half).all()


def test_auto_choice_picks_the_uneven_input_and_improves_fidelity():
    torch.manual_seed(0)
    calib, x = _calib(6), _calib(1, seed=7)[0]
    float_model = UnevenMLP()
    ref = float_model(x).detach()

    def run(auto: int) -> tuple[float, dict]:
        model = copy.deepcopy(float_model)
        cfg = RepQConfig(**FAST, reconstruction="none", auto_channel=auto, channel_floor=0.0)
        result = quantize_model(model, calib, [], cfg)
        with torch.no_grad():
            out = model(x)
        err = float((out - ref).norm() / ref.norm())
        return err, result.metrics.get("channel_sites", {})

    err_tensor, _ = run(0)
    err_channel, report = run(2)
    assert report["sites"][0] == "fc2", report  # the most uneven input gains the most
    assert "even" not in report["sites"], report  # an even input does not gain enough to be chosen
    assert report["scan"]["gain_if_per_channel"]["fc2"] > 0
    assert err_channel < 0.5 * err_tensor, (err_channel, err_tensor)


def test_channel_site_exports_per_channel_quantize_and_keeps_integer_kernels(tmp_path: Path):
    model = tiny_bert()
    batches = text_batches(n=3)
    cfg = RepQConfig(**FAST, channel_sites=["*.output.dense"])
    result = quantize_model(model, batches, _pairs(model), cfg)
    sites = result.metrics["channel_sites"]["sites"]
    assert sites and all(s.endswith("output.dense") for s in sites)
    assert not {n for n, _ in candidates(model)} & set(sites)  # now reparameterized, consumer side
    path = export_qdq(model, batches[0], tmp_path / "q.onnx")
    check = verify_qdq(path, model, text_batches(n=2, seed=5))
    assert check["min_cosine"] > 0.999 and check["relative_error"] < 0.03, check
    kernels = ort_kernels(path)
    assert integer_kernel_count(kernels) >= 2 * 6, kernels


def test_norm_floor_auto_follows_the_consumers_weight_bits():
    """Reparameterization spreads weight columns by r1: at 4-bit weights the post-norm scales get a floor."""
    from modelpress.quantize.fakequant import QuantLinear
    from modelpress.quantize.reparam import NormGroup
    from modelpress.quantize.repq import norm_floor

    def group(w_bits: int) -> NormGroup:
        lin = QuantLinear(nn.Linear(8, 8), w_bits=w_bits, a_bits=8)
        return NormGroup("norm", nn.LayerNorm(8), [("lin", lin)], lin.input_quantizer)

    assert norm_floor(group(8), "auto") == 0.0 and norm_floor(group(6), "auto") == 0.0
    assert norm_floor(group(4), "auto") == 0.25 and 0 < norm_floor(group(5), "auto") < 0.25
    assert norm_floor(group(4), 0.0) == 0.0  # an explicit setting wins


def test_quantization_is_deterministic():
    """Same model, data and config: identical scales, zero points and reconstructed weights."""
    from tests.quantize.test_export_qdq import _pairs as pairs

    states = []
    for _ in range(2):
        model = tiny_bert()
        cfg = RepQConfig(auto_channel=2, channel_floor=0.25)  # MSE observers, GPTQ, the site scan
        quantize_model(model, text_batches(n=4), pairs(model), cfg)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k
