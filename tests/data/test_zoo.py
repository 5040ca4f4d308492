"""The digits zoo: trained once per machine into the cache, accurate on held-out digits."""

from __future__ import annotations

import time

import torch

from modelpress.data import zoo


def test_digits_cnn_accuracy_and_cache():
    first = zoo.digits_cnn()
    assert first.test_accuracy >= 0.95
    t = time.perf_counter()
    again = zoo.digits_cnn()
    assert time.perf_counter() - t < 5
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(first.module(x), again.module(x))
