"""Mask rearrangement (Kwon et al., "A Fast Post-Training Pruning Framework for Transformers", NeurIPS 2022):
given HOW MANY units of one layer go, re-choose WHICH, using the layer's block of the Fisher information of the
unit masks instead of its diagonal alone.

Put a mask ``m_u`` (1 = kept) on each unit's output. To second order around ``m = 1`` the loss increase of
removing the set ``S`` is ``1_S^T F 1_S / 2`` with ``F = E[g g^T]`` the Fisher of the mask variables (``g``:
per-sample gradients of the loss with respect to the layer's masks). Ranking by the diagonal
``F_uu`` (what per-unit saliency does) ignores that two units' gradients may cancel or add up; the
rearrangement keeps the layer's count and greedily swaps units to lower ``1_S^T F 1_S``. Across layers the
Fisher is taken as block diagonal (the counts per layer come from the ranking that called it).

The mask gradient of a unit is ``sum_c W[:, c] . dL/dW[:, c]`` over the columns ``c`` that READ the unit (an
attention output projection's columns of a head, an MLP's second-layer column of a hidden unit): scaling those
columns is scaling the unit's output. :func:`mask_scores` takes it from probed per-sample gradients
(``modelpress.data.probes`` with ``stats={"grads"}`` on single-sample batches).
"""

from __future__ import annotations

import numpy as np
import torch

from modelpress.data.probes import Statistics
from modelpress.graph.groups import Group

__all__ = ["mask_fisher", "mask_scores", "rearrange", "removal_loss"]


def mask_scores(stats: Statistics, group: Group) -> np.ndarray:
    """Per-sample (per-batch) mask gradient of each unit of ``group``: ``[batches, units]`` (float64), from the
    gradients ``stats`` holds for the group's reading parameters (``group.meta["input_slots"]``)."""
    reads = [s for s in group.meta.get("input_slots") or [] if s[0] in stats.grads]
    if not reads:
        raise ValueError(f"no gradients of {group.name}'s reading parameters were collected")
    cols = []
    for unit in group.units:
        parts = [(param, (slice(None),) * axis + (torch.as_tensor(unit[(param, axis)]),))
                 for param, axis in reads if (param, axis) in unit]
        cols.append(stats.group_scores(parts).numpy())
    return np.stack(cols, axis=1)


def mask_fisher(scores: np.ndarray) -> np.ndarray:
    """The layer's block of the empirical Fisher of its masks, ``E[g g^T]`` over the rows of ``scores``."""
    s = np.asarray(scores, dtype=np.float64)
    return s.T @ s / max(1, s.shape[0])


def removal_loss(fisher: np.ndarray, removed: list[int] | np.ndarray) -> float:
    """``1_S^T F 1_S``: the second-order loss increase (up to 1/2) of removing units ``S`` together."""
    idx = np.asarray(removed, dtype=np.int64)
    return float(fisher[np.ix_(idx, idx)].sum()) if idx.size else 0.0


def rearrange(scores: np.ndarray, n_remove: int, initial: list[int] | np.ndarray | None = None,
              max_passes: int = 4) -> list[int]:
    """The ``n_remove`` units to remove from one layer, rearranged with its Fisher block (sorted indices).

    Starts from ``initial`` (the ranking's choice; default: the ``n_remove`` smallest diagonal entries), then,
    for each kept unit in increasing diagonal order, adds it to the removed set and takes out the unit whose
    return lowers ``1_S^T F 1_S`` the most (possibly the one just added): the loss never increases. Passes
    repeat until nothing changes (at most ``max_passes``). A local search by single swaps, as in the paper:
    two units that only pay off together (gradients that cancel in pairs) are not found."""
    fisher = mask_fisher(scores)
    units = fisher.shape[0]
    if not 0 <= n_remove < units:
        raise ValueError(f"cannot remove {n_remove} of {units} units (keep at least one)")
    diag = np.diag(fisher)
    order = np.argsort(diag, kind="stable")
    removed = set(order[:n_remove].tolist() if initial is None else [int(u) for u in initial])
    if len(removed) != n_remove:
        raise ValueError(f"initial names {len(removed)} distinct units, not {n_remove}")
    if n_remove == 0:
        return []
    for _ in range(max_passes):
        changed = False
        for j in order.tolist():
            if j in removed:
                continue
            trial = np.array(sorted(removed | {j}))
            ones = fisher[:, trial].sum(axis=1)  # F 1_S' per unit
            drop = trial[int(np.argmin(diag[trial] - 2.0 * ones[trial]))]  # L(S' - i) = L(S') - 2 (F1)_i + F_ii
            if drop != j:
                removed = set(trial.tolist()) - {int(drop)}
                changed = True
        if not changed:
            break
    return sorted(int(u) for u in removed)
