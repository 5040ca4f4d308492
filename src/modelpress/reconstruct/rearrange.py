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

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.data.probes import Statistics
from modelpress.graph.groups import Group
from modelpress.graph.run import as_tensors, call_module, primary_output

__all__ = ["collect_mask_scores", "mask_fisher", "mask_scores", "rearrange", "removal_loss"]


def mask_scores(stats: Statistics, group: Group) -> np.ndarray:
    """Per-sample (per-batch) mask gradient of each unit of ``group``: ``[batches, units]`` (float64), from the
    gradients ``stats`` holds for the group's reading parameters (``group.meta["input_slots"]``)."""
    reads = _reads(group, stats.grads)
    if not reads:
        raise ValueError(f"no gradients of {group.name}'s reading parameters were collected")
    cols = []
    for unit in group.units:
        parts = [(param, (slice(None),) * axis + (torch.as_tensor(unit[(param, axis)]),))
                 for param, axis in reads if (param, axis) in unit]
        cols.append(stats.group_scores(parts).numpy())
    return np.stack(cols, axis=1)


def _reads(group: Group, names: Iterable[str]) -> list[tuple[str, int]]:
    have = set(names)
    return [s for s in group.meta.get("input_slots") or [] if s[0] in have]


def collect_mask_scores(
    module: nn.Module,
    groups: Sequence[Group],
    samples: Iterable[Mapping[str, Any]],
    loss_fn: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor],
    input_names: Sequence[str],
) -> dict[str, np.ndarray]:
    """Per-sample mask gradients ``[samples, units]`` of each group (by name), one backward per sample.

    ``samples``: single-sample batches (dicts of tensors); ``loss_fn(output, sample)`` the loss whose Fisher is
    wanted (a Monte-Carlo Fisher loss: targets drawn from the model's own predictions). Each sample's gradients
    are reduced to one number per unit at once, so memory is one gradient of the reading weights, never one per
    sample (``probes``' ``"grads"`` keeps every sample's)."""
    params = dict(module.named_parameters())
    reads = {g.name: _reads(g, params) for g in groups}
    names = sorted({p for slots in reads.values() for p, _ in slots})
    if not names:
        return {g.name: np.zeros((0, g.size)) for g in groups}
    flags = {n: params[n].requires_grad for n in names}
    rows: dict[str, list[np.ndarray]] = {g.name: [] for g in groups}
    like = params[names[0]]
    was = module.training
    module.eval()
    try:
        for n in names:
            params[n].requires_grad_(True)
        for sample in samples:
            fed = as_tensors(sample, input_names, like)
            loss = loss_fn(primary_output(call_module(module, fed, list(fed))), sample)
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            wg = {n: (torch.zeros_like(params[n]) if g is None else g).detach().double() * params[n].detach().double()
                  for n, g in zip(names, grads, strict=True)}
            for g in groups:
                rows[g.name].append(np.array([
                    float(sum(wg[p].index_select(axis, torch.as_tensor(unit[(p, axis)])).sum()
                              for p, axis in reads[g.name] if (p, axis) in unit))
                    for unit in g.units]))
    finally:
        for n, f in flags.items():
            params[n].requires_grad_(f)
        module.train(was)
    return {k: np.stack(v) if v else np.zeros((0, 0)) for k, v in rows.items()}


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
