"""Activation features: rows are sampled as the batches arrive, the same rows for a seed, never more than
max_rows held per site."""

from __future__ import annotations

import torch

from modelpress.data import sampling
from modelpress.fuse.features import ActivationFeatures
from modelpress.fuse.spaces import build_spaces
from tests.fuse.tiny import batches, digits_vit


def test_activation_rows_are_seeded_and_bounded_while_they_arrive(monkeypatch):
    vit = digits_vit(1)
    spaces = build_spaces(vit)
    data = batches(vit, n=6, size=8)  # 6 x 8 samples x 5 tokens = 240 token rows per token-level site
    held: list[int] = []
    add = sampling.RowSample.add

    def counting_add(self, x):  # noqa: ANN001, ANN202
        add(self, x)
        if self.max_rows is not None:  # the sites' samples (the probe's own per-batch rows keep every row)
            held.append(self.held)

    monkeypatch.setattr(sampling.RowSample, "add", counting_add)
    a = ActivationFeatures(vit, spaces, data, max_rows=30, seed=4)
    assert held and max(held) <= 30
    b = ActivationFeatures(vit, spaces, data, max_rows=30, seed=4)
    full = ActivationFeatures(vit, spaces, data, max_rows=10_000)
    assert a.rows.keys() == b.rows.keys() == full.rows.keys()
    token_level = [k for k, x in full.rows.items() if x.shape[0] == 240]
    assert token_level
    for key, rows in a.rows.items():
        torch.testing.assert_close(b.rows[key], rows)
        assert rows.shape[0] == min(30, full.rows[key].shape[0])
    for key in token_level:  # a subset of the rows, and not simply the first 30
        assert all(bool((full.rows[key] == r).all(1).any()) for r in a.rows[key])
        assert not torch.equal(a.rows[key], full.rows[key][:30])
    c = ActivationFeatures(vit, spaces, data, max_rows=30, seed=5)
    assert any(not torch.equal(c.rows[k], a.rows[k]) for k in token_level)
