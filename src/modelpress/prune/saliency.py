"""Saliency of the units of a group: how much each unit matters, higher is kept."""

from __future__ import annotations

import numpy as np
import torch

from modelpress.graph import Group, ModelGraph


def magnitude(graph: ModelGraph, group: Group) -> np.ndarray:
    """L2 norm of each unit's weight slices, summed over the matrices/kernels it touches.

    Vectors (biases, norm scales) are left out: their scale is not comparable to weights'.
    """
    state = graph.state()
    scores = np.zeros(group.size, dtype=np.float64)
    for slot in group.slots:
        param, axis = slot
        t = state[param].detach().float()
        if t.dim() < 2:
            continue
        moved = t.movedim(axis, 0).reshape(t.shape[axis], -1)
        sq = (moved**2).sum(1)
        for u, unit in enumerate(group.units):
            scores[u] += float(torch.sqrt(sq[torch.as_tensor(unit[slot])].sum()))
    return scores


SALIENCY = {"magnitude": magnitude}
