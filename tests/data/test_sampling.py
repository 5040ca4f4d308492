"""Row sampling as rows arrive: seeded, uniform, never holding more than max_rows, whatever the chunking."""

from __future__ import annotations

import numpy as np
import torch

from modelpress.data.sampling import RowSample


def _stream(sample: RowSample, x: torch.Tensor, sizes: list[int]) -> list[int]:
    held, at = [], 0
    for n in sizes:
        sample.add(x[at : at + n])
        at += n
        held.append(sample.held)
    return held


def test_the_sample_is_seeded_bounded_ordered_and_independent_of_the_chunking():
    x = torch.arange(1000, dtype=torch.float32).reshape(-1, 1).repeat(1, 3)  # row i holds i
    a, b = RowSample(50, seed=(7, 1)), RowSample(50, seed=(7, 1))
    held = _stream(a, x, [100] * 10)
    _stream(b, x, [3, 400, 1, 96, 250, 250])
    assert max(held) == 50 and a.seen == 1000
    rows = a.rows()
    assert rows.shape == (50, 3)
    torch.testing.assert_close(b.rows(), rows)  # the same rows however the stream was cut
    assert torch.all(rows[1:, 0] > rows[:-1, 0])  # arrival order
    other = RowSample(50, seed=(7, 2))
    _stream(other, x, [100] * 10)
    assert not torch.equal(other.rows(), rows)
    small = RowSample(50, seed=0)
    _stream(small, x[:30], [10, 20])
    torch.testing.assert_close(small.rows(), x[:30])  # fewer rows than max_rows: all of them
    assert RowSample(None).rows() is None


def test_every_row_is_equally_likely():
    n, k, draws = 40, 10, 4000
    counts = np.zeros(n)
    x = torch.arange(n, dtype=torch.float32).reshape(-1, 1)
    for seed in range(draws):
        s = RowSample(k, seed=seed)
        _stream(s, x, [7, 13, 20])
        counts[s.rows()[:, 0].long().numpy()] += 1
    expected = draws * k / n  # 1000 per row; binomial sd ~ 27
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected * (1 - k / n))
