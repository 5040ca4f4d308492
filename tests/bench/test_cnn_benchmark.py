"""The CNN benchmark's pieces that decide its numbers: the photo crops (deterministic, calibration and
fidelity draws disjoint, normalized) and the verdict (modelpress against ort-static and fp32)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from tests.bench.scripts import load_benchmark


def _benchmark():  # noqa: ANN202 - the benchmark script as a module
    return load_benchmark("cnn")


def test_photo_crops_are_seeded_disjoint_and_normalized():
    pytest.importorskip("sklearn")
    pytest.importorskip("PIL")
    bench = _benchmark()
    mean, std = bench.IMAGENET
    cal = bench.photo_crops(6, (32, 48), mean, std, seed=1)
    assert cal.shape == (6, 3, 32, 48) and cal.dtype == np.float32
    np.testing.assert_array_equal(cal, bench.photo_crops(6, (32, 48), mean, std, seed=1))
    fid = bench.photo_crops(6, (32, 48), mean, std, seed=2)
    assert not any(np.allclose(a, b) for a in cal for b in fid)
    assert abs(float(cal.mean())) < 1.5 and 0.3 < float(cal.std()) < 3  # ImageNet-normalized, not [0, 255]


@dataclass
class _Stats:
    round_medians_ms: list[float]
    speedup: float


class _Report:
    def __init__(self, ms: dict[str, list[float]]) -> None:
        self.variants = ms

    def stats(self, name: str, batch: int) -> _Stats:
        base = self.variants["fp32"]
        mine = self.variants[name]
        return _Stats(mine, float(np.median([b / m for b, m in zip(base, mine, strict=True)])))


def _info(ours_cos: float, peer_cos: float) -> dict:
    return {"modelpress": {"fidelity": {"cosine_mean": ours_cos}}, "ort-static": {"fidelity": {"cosine_mean": peer_cos}}}


def test_verdict_needs_speed_fidelity_and_fp32():
    bench = _benchmark()
    fast = _Report({"fp32": [10, 10, 10], "ort-static": [6, 6, 6], "modelpress": [5, 5, 5]})
    assert bench.verdict("resnet18", _info(0.9999, 0.9998), fast, [1])["passed"] is True
    assert bench.verdict("resnet18", _info(0.9990, 0.9998), fast, [1])["passed"] is False  # less faithful
    slow = _Report({"fp32": [10, 10, 10], "ort-static": [5, 5, 5], "modelpress": [8, 8, 8]})
    v = bench.verdict("resnet18", _info(0.9999, 0.9998), slow, [1])
    assert v["passed"] is False and v["batches"]["batch1"]["modelpress_vs_ort_static"] == pytest.approx(5 / 8)
    slower_than_fp32 = _Report({"fp32": [10, 10, 10], "ort-static": [12, 12, 12], "modelpress": [11, 11, 11]})
    assert bench.verdict("resnet18", _info(1.0, 0.99), slower_than_fp32, [1])["passed"] is False
    assert bench.verdict("resnet18", _info(1.0, 0.99), None, [1])["passed"] is None
