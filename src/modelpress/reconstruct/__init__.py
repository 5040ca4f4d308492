"""Layer-wise reconstruction after structural edits: refit the layers that read removed units so their outputs
match the original's on calibration data (least squares from probed second moments, sequential, with bias
compensation), the service prune, search extraction, fusion and block removal share.

Modules, bottom up: :mod:`.solve` (the least-squares / structured-OBS refit of one layer from its statistics),
:mod:`.layers` (Linear, Conv1D and im2col Conv2d as one ``[out, columns]`` matrix), :mod:`.maps` (which
original channels each pruned layer kept, from the unit lineage), :mod:`.sequential` (the forward-order
service over two modules), :mod:`.graphs` (the same over two ModelGraphs) and :mod:`.rearrange` (Kwon et
al.'s Fisher-based mask rearrangement, choosing which units to keep before the refit).
"""

from __future__ import annotations

from modelpress.reconstruct.graphs import reconstruct_graph
from modelpress.reconstruct.maps import LayerMap, layer_map
from modelpress.reconstruct.rearrange import mask_fisher, mask_scores, rearrange, removal_loss
from modelpress.reconstruct.sequential import LayerResult, reconstruct_layers, residual_consumer
from modelpress.reconstruct.solve import (
    DEFAULT_DAMP,
    PairStats,
    Refit,
    obs_update,
    output_error,
    refit,
    stats_from_gram,
)

__all__ = [
    "DEFAULT_DAMP",
    "LayerMap",
    "LayerResult",
    "PairStats",
    "Refit",
    "layer_map",
    "mask_fisher",
    "mask_scores",
    "obs_update",
    "output_error",
    "reconstruct_graph",
    "reconstruct_layers",
    "residual_consumer",
    "rearrange",
    "removal_loss",
    "refit",
    "stats_from_gram",
]
