"""Reconstruction after pruning: the prune passes' call into :mod:`modelpress.reconstruct` (one place for the
data it uses and what it reports)."""

from __future__ import annotations

from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.reconstruct import DEFAULT_DAMP, reconstruct_graph


def reconstruct_pruned(original: ModelGraph, pruned: ModelGraph, ctx, damp: float = DEFAULT_DAMP) -> dict:  # noqa: ANN001
    """Refit ``pruned``'s readers of removed units to ``original``'s outputs on the Context's calibration split
    (in place); the per-layer output errors before and after, for the pass's metrics."""
    data = ctx.calibration if ctx is not None else None
    if data is None or not data.batches:
        raise ModelpressError("reconstruct needs calibration data", "give --data, or set reconstruct: false")
    with ctx.reporter.step("reconstructing the layers that read removed units"):
        return reconstruct_graph(original, pruned, data.batches, damp=damp, reporter=ctx.reporter)
