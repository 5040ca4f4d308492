"""How much of a unit's removal the least-squares refit repairs: the ranking's view of the refit (ZipLM's OBS error).

A unit read by a Linear through columns ``S`` (a head: its ``head_dim`` columns of the attention output
projection; an MLP hidden unit: one column of the second Linear) changes that layer's output, when removed, by
``W[:, S] x_S``. Without a refit (only the bias compensating its mean) the output error is
``e_raw = tr(W_S C_SS W_S^T)``, with ``C`` the covariance of the layer's inputs on calibration rows. With every
other column refit by least squares (what :mod:`modelpress.reconstruct` does afterwards) it falls to the
structured OBS error ``e_fit = tr(W_S [(C + lambda I)^-1]_SS^-1 W_S^T)`` (Kurtic et al., ZipLM, NeurIPS 2023).
The ratio ``e_fit / e_raw`` in ``(0, 1]`` is the share of the damage the refit cannot undo: a unit whose output
its neighbours can reproduce costs little once the model is refit, whatever its saliency. Multiplying a unit's
loss saliency by it keeps scores comparable across layers (loss units) while ranking by what survives the
refit. Single-unit removals: units that go together in one layer interact (the refit iterations re-score).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.data import probes
from modelpress.graph.groups import Group
from modelpress.reconstruct.solve import DEFAULT_DAMP

__all__ = ["compensable_fractions", "remaining_fractions"]


def _reader(module: nn.Module, group: Group) -> tuple[str, str] | None:
    """The one Linear weight that reads ``group``'s units along its input axis: (module name, parameter name)."""
    for param, axis in group.meta.get("input_slots") or []:
        name, _, leaf = param.rpartition(".")
        if leaf != "weight" or axis != 1:
            continue
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(layer, nn.Linear):
            return name, param
    return None


def remaining_fractions(weight: torch.Tensor, gram: torch.Tensor, mean: torch.Tensor, columns: Sequence[Sequence[int]],
                        damp: float = DEFAULT_DAMP) -> np.ndarray:
    """For each set of input columns of one Linear (``weight`` [out, in]), ``e_fit / e_raw`` of removing it alone:
    the output error left after refitting every other column by least squares (bias free), over the error without
    a refit (bias compensated). ``gram``: ``X^T X / n`` of the inputs [in, in]; ``mean``: their mean [in];
    ``damp``: the refit's damping, a fraction of the covariance's mean diagonal. A set whose inputs never vary
    (``e_raw = 0``) gets 1."""
    w = weight.detach().double()
    cov = gram.double() - torch.outer(mean.double(), mean.double())
    cov = (cov + cov.t()) / 2
    lam = damp * float(cov.diagonal().mean().clamp_min(1e-12))
    inv = torch.linalg.inv(cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype))
    out = np.ones(len(columns))
    for i, cols in enumerate(columns):
        idx = torch.as_tensor(list(cols), dtype=torch.long)
        ws = w[:, idx]
        raw = float(torch.einsum("oi,ij,oj->", ws, cov[idx][:, idx], ws))
        if raw <= 0.0:
            continue
        fit = float(torch.einsum("oi,ij,oj->", ws, torch.linalg.inv(inv[idx][:, idx]), ws))
        out[i] = min(1.0, max(0.0, fit / raw))
    return out


def compensable_fractions(module: nn.Module, groups: Iterable[Group], batches: Iterable[Any],
                          damp: float = DEFAULT_DAMP, input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per unit of each group read by a Linear's input columns (heads, MLP units), the share of its removal's output
    error that the least-squares refit cannot undo (:func:`remaining_fractions`), from one probed forward of
    ``module`` over ``batches`` (``X^T X`` of the readers' inputs, with a ones column for their means). Groups
    without such a reader are left out (callers keep their saliency)."""
    readers: dict[str, tuple[str, str]] = {}
    for g in groups:
        r = _reader(module, g)
        if r is not None and g.units:
            readers[g.name] = r
    if not readers:
        return {}
    layers = sorted({name for name, _ in readers.values()})

    def with_ones(_m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)

    fed = _named(batches, input_names)
    stats = probes.collect(module, fed, layers, stats=("xtx",), transform=with_ones, label_key=None)
    params = dict(module.named_parameters())
    by_layer: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in layers:
        h = stats[name].hessian()  # [[X^T X, X^T 1], [1^T X, n]] / n
        by_layer[name] = (h[:-1, :-1], h[:-1, -1])
    out = {}
    for g in groups:
        if g.name not in readers:
            continue
        name, param = readers[g.name]
        slot = next(s for s in g.units[0] if s[0] == param and s[1] == 1)
        cols = [np.asarray(u[slot]).reshape(-1).tolist() for u in g.units]
        gram, mean = by_layer[name]
        out[g.name] = remaining_fractions(params[param], gram, mean, cols, damp)
    return out


def _named(batches: Iterable[Any], names: Sequence[str] | None) -> list[Any]:
    """Batches restricted to the model's input names (dict batches), so probes passes only what the model takes."""
    if names is None:
        return list(batches)
    keep = set(names)
    return [{k: v for k, v in b.items() if k in keep} if isinstance(b, dict) else b for b in batches]
