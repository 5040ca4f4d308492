"""Quantizer round trips, observers, log2 / log-sqrt2 and the log-sqrt2 -> log2 reparameterization."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from modelpress.quantize.log2 import log2_matmul, log2_matmul_integer
from modelpress.quantize.observers import make_observer
from modelpress.quantize.quantizers import (
    Log2Quantizer,
    LogSqrt2Quantizer,
    UniformQuantizer,
    export_active,
    export_mode,
    qrange,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, 0])
def test_uniform_round_trip_error_is_half_a_step(bits, symmetric, axis):
    torch.manual_seed(bits)
    x = torch.randn(16, 64) * torch.linspace(0.1, 4.0, 16).unsqueeze(1) + (0.0 if symmetric else 0.7)
    q = UniformQuantizer(bits, symmetric=symmetric, axis=axis)
    obs = make_observer("minmax", axis=axis)
    obs.update(x)
    obs.apply(q)
    codes = q.quant(x)
    assert torch.equal(codes, codes.round()) and codes.min() >= q.qmin and codes.max() <= q.qmax
    err = (q.dequant(codes) - x).abs()
    step = q.scale.reshape(-1, 1) if axis == 0 else q.scale
    assert torch.all(err <= step / 2 + 1e-6)  # inside the calibrated range: at most half a step
    assert torch.equal(q(x), q.dequant(codes))


def test_code_ranges_and_zero_point():
    assert qrange(8, True) == (-128, 127) and qrange(8, True, narrow=True) == (-127, 127)
    assert qrange(4, False) == (0, 15)
    q = UniformQuantizer(8, symmetric=False)
    q.set_range(-1.0, 3.0)
    assert q.zero_point == torch.round(q.zero_point) and 0 <= q.zero_point <= 255
    assert q.dequant(q.quant(torch.zeros(1))) == 0  # zero is exactly representable


def test_fake_quant_straight_through_gradient():
    q = UniformQuantizer(4, symmetric=True)
    q.set_range(-1.0, 1.0)
    x = torch.linspace(-0.9, 0.9, 11, requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("kind", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("axis", [None, -1])
def test_observers_bound_the_error(kind, axis):
    torch.manual_seed(0)
    x = torch.randn(256, 8) * torch.tensor([0.1, 0.5, 1, 2, 4, 8, 0.3, 1.5])
    q = UniformQuantizer(8, symmetric=False, axis=axis)
    obs = make_observer(kind, axis=axis)
    obs.update(x[:128])
    obs.update(x[128:])
    obs.apply(q)
    rel = ((q(x) - x).norm() / x.norm()).item()
    assert rel < 0.02
    if axis is not None:
        assert q.scale.shape == (8,)


def test_mse_observer_clips_outliers_better_than_minmax():
    torch.manual_seed(0)
    x = torch.randn(4096, 1)
    x[0] = 60.0  # one outlier
    errs = {}
    for kind in ("minmax", "mse"):
        q = UniformQuantizer(4, symmetric=True)
        obs = make_observer(kind)
        obs.update(x)
        obs.apply(q)
        errs[kind] = ((q(x) - x) ** 2).mean().item()
    assert errs["mse"] < errs["minmax"]


@pytest.mark.parametrize("cls, base", [(Log2Quantizer, 2.0), (LogSqrt2Quantizer, math.sqrt(2.0))])
def test_log_quantizers_relative_error(cls, base):
    q = cls(bits=6)
    q.set_scale(1.0)
    p = torch.softmax(torch.randn(4, 16, 16) * 3, dim=-1)
    deq = q(p)
    big = p > 1e-4
    # a level halfway (in log space) between two powers: relative error at most base**0.5 - 1
    rel = ((deq[big] - p[big]).abs() / p[big]).max().item()
    assert rel <= math.sqrt(base) - 1 + 1e-5
    assert torch.all(q.dequant(torch.tensor([float(q.zero_code)])) == 0)


def test_log_sqrt2_is_finer_than_log2():
    p = torch.softmax(torch.randn(8, 32, 32) * 2, dim=-1)
    errs = []
    for cls in (Log2Quantizer, LogSqrt2Quantizer):
        q = cls(bits=4)
        q.set_scale(1.0)
        errs.append(((q(p) - p) ** 2).sum().item())
    assert errs[1] < errs[0]


def test_log_sqrt2_to_log2_reparameterization_is_exact():
    torch.manual_seed(0)
    q = LogSqrt2Quantizer(bits=4)
    q.set_scale(0.9)
    probs = torch.softmax(torch.randn(2, 3, 8, 8) * 3, dim=-1)
    v = torch.randn(2, 3, 8, 5, dtype=torch.float64)
    codes = q.quant(probs)
    reference = q.dequant(codes).double() @ v
    # float form: shifts on even and odd codes, one sqrt(2) factor on the odd partial sum
    q64 = LogSqrt2Quantizer(bits=4)
    q64.set_scale(0.9)
    torch.testing.assert_close(log2_matmul(codes.double(), q64, v), reference, rtol=1e-6, atol=1e-7)
    # integer form: V codes shifted and added in int64, exactly
    v_codes = torch.randint(-128, 128, (2, 3, 8, 5))
    even, odd, frac = log2_matmul_integer(codes, q, v_codes)
    c = codes.double()
    levels = torch.where(c >= q.zero_code, torch.zeros_like(c), float(q.scale) * 2.0 ** (-c / 2))
    exact = levels @ v_codes.double()
    rebuilt = float(q.scale) * (even.double() + math.sqrt(2.0) * odd.double()) / 2**frac
    torch.testing.assert_close(rebuilt, exact, rtol=1e-12, atol=1e-12)
    assert even.dtype == torch.int64


def test_export_mode_holds_only_in_the_exporting_thread():
    """A search exporting one model in a thread must not switch another thread's forwards to export form."""
    q = UniformQuantizer(8, axis=-1)  # per-channel activations have no QDQ form: export mode raises
    q.set_range(torch.full((4,), -1.0), torch.linspace(0.5, 2.0, 4))
    x = torch.linspace(-1.0, 2.0, 8).reshape(2, 4)
    entered, release = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def exporter() -> None:
        with export_mode(log_form="simulate"):
            seen["exporter"] = export_active()
            entered.set()
            release.wait(10)
        seen["exporter after"] = export_active()

    thread = threading.Thread(target=exporter)
    thread.start()
    try:
        assert entered.wait(10)
        seen["runner"] = export_active()
        out = q(x)  # fake-quantizes while the other thread is inside export_mode
    finally:
        release.set()
        thread.join(10)
    assert seen == {"exporter": True, "runner": False, "exporter after": False}
    assert torch.equal(out, q.fake_quant(x))
    with export_mode(), pytest.raises(NotImplementedError):
        q(x)  # in its own thread the mode does switch the quantizer
    assert not export_active()
