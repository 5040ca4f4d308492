"""Reconstruction of a pruned ``ModelGraph`` against the graph it was pruned from: the entry point passes call."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from modelpress.graph import ModelGraph
from modelpress.progress import QUIET, Reporter
from modelpress.reconstruct.maps import layer_map
from modelpress.reconstruct.sequential import reconstruct_layers
from modelpress.reconstruct.solve import DEFAULT_DAMP

__all__ = ["reconstruct_graph"]


def reconstruct_graph(
    original: ModelGraph,
    pruned: ModelGraph,
    batches: Iterable[Any],
    *,
    damp: float = DEFAULT_DAMP,
    intercept: bool = True,
    sequential: bool = True,
    create_bias: bool = True,
    input_names: Sequence[str] | None = None,
    reporter: Reporter = QUIET,
    mode: str = "weights",
    residual: bool = False,
    scope: str = "readers",
    staged: bool = True,
) -> dict[str, Any]:
    """Refit, in place, every layer of ``pruned`` that reads removed units so its outputs on ``batches`` match
    ``original``'s (see :func:`modelpress.reconstruct.sequential.reconstruct_layers`); which original
    channels each layer kept comes from the graphs' unit lineage. ``create_bias``: a bias-less Linear or Conv2d
    whose refit is applied gets a bias (``ModelGraph.add_bias``, recorded) so the intercept compensates the
    removed units' mean. Returns metrics for the pass's report:
    per layer the relative output error on the calibration rows before and after, the layers skipped and why,
    and the mean errors. ``scope``: ``readers`` (the layers that lost input channels) or ``all`` (every
    refittable layer, so the layers after a pruned one also absorb the drift of their inputs). ``staged``: False
    re-runs both models from their inputs for every layer (the same refit, time quadratic in depth)."""
    if scope not in ("readers", "all"):
        raise ValueError(f"scope must be 'readers' or 'all', not {scope!r}")
    readers, skipped = layer_map(original, pruned, every=scope == "all")
    names = list(input_names) if input_names is not None else list(pruned.input_spec.names)
    results = reconstruct_layers(original.module, pruned.module, readers, batches, input_names=names, damp=damp,
                                 intercept=intercept, sequential=sequential,
                                 add_bias=pruned.add_bias if create_bias and intercept else None, reporter=reporter,
                                 mode=mode, residual=residual, staged=staged)
    layers = {n: r.as_dict() for n, r in results.items()}
    out: dict[str, Any] = {"layers": layers, "skipped": skipped, "damp": damp, "intercept": intercept,
                           "sequential": sequential, "mode": mode,
                           "residual": residual, "scope": scope}
    if results:
        out["error_before_mean"] = float(np.mean([r.error_before for r in results.values()]))
        out["error_after_mean"] = float(np.mean([r.error_after for r in results.values()]))
        out["refit"] = sum(r.applied for r in results.values())
    return out
