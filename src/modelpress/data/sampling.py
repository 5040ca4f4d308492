"""Row sampling as rows arrive: a uniform sample of at most ``max_rows`` rows from a stream of chunks.

Each row gets a random key from a generator seeded by ``seed`` when it arrives; the sample is the rows with
the ``max_rows`` smallest keys (bottom-k sampling: uniform without replacement over every row seen), kept
in arrival order. The keys depend on the seed and on how many rows came before, never on the values, so
two models fed the same batches keep the same positions, and at most ``max_rows`` rows plus the chunk
being added are held at any time.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["RowSample"]


class RowSample:
    """A seeded uniform sample of at most ``max_rows`` rows ([rows, features] chunks; None keeps all)."""

    def __init__(self, max_rows: int | None, seed: int | tuple[int, ...] = 0) -> None:
        self.max_rows = max_rows
        self.gen = np.random.default_rng(seed)
        self.seen = 0  # rows offered so far
        self._rows: list[torch.Tensor] = []  # held chunks (one, once a sample is drawn)
        self._keys: torch.Tensor | None = None
        self._order: torch.Tensor | None = None  # arrival index of each held row

    @property
    def held(self) -> int:
        """Rows held now."""
        return sum(t.shape[0] for t in self._rows)

    def add(self, x: torch.Tensor) -> None:
        """Offer the rows of ``x`` [rows, features]."""
        n = x.shape[0]
        if self.max_rows is None:
            self._rows.append(x)
            self.seen += n
            return
        keys = torch.from_numpy(self.gen.random(n))
        order = torch.arange(self.seen, self.seen + n)
        self.seen += n
        if self._keys is not None:
            x, keys, order = torch.cat([self._rows[0], x]), torch.cat([self._keys, keys]), torch.cat([self._order, order])
        if x.shape[0] > self.max_rows:
            pick = torch.sort(torch.topk(keys, self.max_rows, largest=False).indices).values
            x, keys, order = x[pick], keys[pick], order[pick]
        self._rows, self._keys, self._order = [x], keys, order

    def rows(self) -> torch.Tensor | None:
        """The sampled rows in arrival order (None when nothing was offered)."""
        if not self._rows:
            return None
        return self._rows[0] if len(self._rows) == 1 else torch.cat(self._rows)
