"""Saliency of the units of graph groups: how much the loss grows when a unit goes (higher is kept).

One interface for every criterion, so pruning and search rank heads, head widths, MLP units,
residual channels and whole blocks on one scale:

* ``magnitude``: the L2 norm of each unit's weight slices, summed over the matrices and kernels it
  touches (no data; vectors such as biases and norm scales are left out).
* ``taylor``: ``E_batches |sum_{s in S} w_s g_s|``, first-order Taylor of removing S, batch by batch.
* ``hessian`` (NViT, Yang et al., CVPR 2023, sec. 3.2): ``E_batches[(sum_{s in S} w_s g_s)^2]``, the mean
  of squares over batches (not the square of the mean). With the Fisher approximation of the Hessian
  ``H ~ E[g g^T]`` this is ``w_S^T H w_S``, twice the second-order loss increase of setting S to zero,
  and it is comparable across layers and kinds without a normalizing constant.
* ``obd`` (Optimal Brain Damage): ``0.5 * sum_{s in S} w_s^2 E_samples[g_s^2]``, the diagonal Fisher from
  per-sample gradients (each sample its own backward pass; :func:`modelpress.data.probes.collect`'s
  ``unit_fisher`` sums, reduced per sample as the gradients arrive).

The loss ``L`` is label-free distillation against the unpruned model: :meth:`Task.fisher_loss`, whose
targets are drawn from the reference's predictive distribution (a Monte-Carlo Fisher: at the unpruned
model the plain distillation gradient is zero, the sampled one is not, and its squared expectation is the
curvature). With ``label_weight > 0`` and labelled data, cross-entropy against the labels is used
instead (NViT's setting). Batches are drawn in the data's order; each batch loss is the mean over its
samples, so the scale of ``hessian`` depends on the batch size: compare scores from one call only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.data.probes import UnitSums, collect
from modelpress.data.sources import DataSplit
from modelpress.data.tasks import Task
from modelpress.errors import ModelpressError
from modelpress.graph import Group, ModelGraph
from modelpress.graph.inputs import primary_output
from modelpress.graph.run import call_module
from modelpress.progress import QUIET, Reporter

__all__ = ["CRITERIA", "group_saliency", "group_units", "magnitude", "unit_sums"]

CRITERIA = ("magnitude", "taylor", "hessian", "obd")
MICRO_BATCH = 4  # samples per backward: one micro-batch's activations are held, not a batch's
# and for text, at most this many tokens per backward: BERT-base at 64 tokens held 247 MiB of activations for 4
# samples (0.6x its weights, the peak of `modelpress prune`); sequences up to 32 tokens keep 4 samples
MICRO_TOKENS = 128
_LABEL_KEY = "labels"


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


def unit_sums(values: dict[str, torch.Tensor], group: Group, lead: int = 0) -> torch.Tensor:
    """``sum_{s in unit} values[param][s]`` for every unit of ``group``: [*lead dims, units] float64.

    ``values[param]`` has the parameter's shape, after ``lead`` leading axes (per batch, say); slots whose
    parameter is missing from ``values`` (buffers) are skipped.
    """
    total: torch.Tensor | None = None
    for param, axis in group.slots:
        if param not in values:
            continue
        v = values[param].double()
        ax = axis + lead
        per_pos = v.movedim(ax, -1)
        per_pos = per_pos.reshape(*per_pos.shape[:lead], -1, per_pos.shape[-1]).sum(dim=lead)  # [*lead, L]
        owner = _owner(group, (param, axis), per_pos.shape[-1])
        sums = torch.zeros(*per_pos.shape[:-1], group.size + 1, dtype=torch.float64)
        sums.index_add_(lead, owner, per_pos)
        part = sums[..., : group.size]
        total = part if total is None else total + part
    if total is None:
        shape = (*next(iter(values.values())).shape[:lead], group.size) if values else (group.size,)
        return torch.zeros(shape, dtype=torch.float64)
    return total


def _owner(group: Group, slot: tuple[str, int], length: int) -> torch.Tensor:
    """Which unit of ``group`` each position of ``slot``'s axis belongs to (``group.size``: none)."""
    owner = torch.full((length,), group.size, dtype=torch.long)
    for u, unit in enumerate(group.units):
        owner[torch.as_tensor(unit[slot], dtype=torch.long)] = u
    return owner


def group_units(module: nn.Module, group: Group) -> UnitSums:
    """``group``'s units as the probe's :class:`UnitSums` (slots on buffers or tied copies are left out)."""
    shapes = {n: p.shape for n, p in module.named_parameters()}
    parts = tuple(
        (param, axis, _owner(group, (param, axis), shapes[param][axis]))
        for param, axis in group.slots if param in shapes
    )
    return UnitSums(group.size, parts)


def group_saliency(
    graph: ModelGraph,
    criterion: str,
    *,
    groups: Sequence[Group] | None = None,
    data: DataSplit | None = None,
    task: Task | None = None,
    reference: nn.Module | None = None,
    label_weight: float = 0.0,
    max_batches: int | None = None,
    obd_samples: int = 64,
    param_sets: dict[str, Sequence[str]] | None = None,
    seed: int = 0,
    micro_batch: int | None = MICRO_BATCH,
    reporter: Reporter = QUIET,
) -> dict[str, np.ndarray]:
    """Per-unit saliency of every group in ``groups`` (default: the graph's prunable groups), by name.

    ``param_sets`` adds whole sets of parameters scored as one unit each (a block: every parameter
    inside it, removed together), under their own names.

    Gradient criteria need ``data`` (batches of the model's inputs), the ``task`` (its
    :meth:`Task.fisher_loss`) and the ``reference`` model to distil from (default: the graph as it is now,
    its own module run without gradients: no copy). One backward pass per batch serves every group
    (``obd``: one per sample, at most ``obd_samples``), each gradient reduced to per-unit sums as it
    arrives (``"unit_wg"`` of :func:`modelpress.data.probes.collect`): memory is the model and one
    gradient, whatever the number of batches. ``hessian`` and ``taylor`` take each batch's gradient
    ``micro_batch`` samples at a time (the batch's loss and targets unchanged; see ``collect``), so the
    backward holds the activations of ``micro_batch`` samples, not of the batch (None: whole batches).
    Deterministic for ``seed``.
    """
    if criterion not in CRITERIA:
        raise ModelpressError(f"unknown saliency {criterion!r}", f"choose one of {', '.join(CRITERIA)}")
    groups = list(groups) if groups is not None else [g for g in graph.groups if g.prunable]
    sets = {k: list(v) for k, v in (param_sets or {}).items()}
    if criterion == "magnitude":
        out = {g.name: magnitude(graph, g) for g in groups}
        state = graph.state()
        for k, names in sets.items():
            out[k] = np.array([float(sum(state[n].detach().double().pow(2).sum() for n in names) ** 0.5)])
        return out
    if data is None or not len(data):
        raise ModelpressError(f"{criterion} saliency needs data to take gradients on", "give calibration data")
    if task is None:
        raise ModelpressError(f"{criterion} saliency needs the task (its loss)", "pass task=")
    if label_weight > 0 and data.labels is None:
        raise ModelpressError(
            "label_weight > 0 asks for labels, and the data has none", "set label_weight=0 (label-free)"
        )
    module = graph.module
    teacher = reference if reference is not None else module
    names = list(graph.input_spec.names)
    _group_params(module, groups)
    units = {g.name: group_units(module, g) for g in groups}
    named = dict(module.named_parameters())
    for k, members in sets.items():
        if k in units:
            raise ModelpressError(f"parameter set {k!r} has the name of a group", "name it apart")
        units[k] = UnitSums(1, tuple((n, None, None) for n in members if n in named))
    batches = _batches(data, max_batches, label_weight > 0)
    if criterion == "obd":
        batches = _single_samples(batches, obd_samples)
    elif micro_batch is not None and graph.input_spec.kind == "text":
        micro_batch = min(micro_batch, max(1, MICRO_TOKENS // max(1, _seq_len(batches, names))))
    loss_fn = _loss(task, teacher, names, label_weight > 0, seed)
    wanted = {"unit_fisher"} if criterion == "obd" else {"unit_wg"}
    was_training = module.training
    module.eval()
    try:
        with _grads_enabled(module):
            stats = collect(
                module, batches, None, wanted, loss_fn=loss_fn, units=units, label_key=_LABEL_KEY,
                micro_batch=None if criterion == "obd" else micro_batch, reporter=reporter,
            )
    finally:
        module.train(was_training)
    reduce = {"obd": lambda m: 0.5 * m.fisher(), "hessian": lambda m: m.hessian(), "taylor": lambda m: m.taylor()}
    return {k: reduce[criterion](stats.units[k]).numpy() for k in units}


def _group_params(module: nn.Module, groups: Sequence[Group]) -> list[str]:
    named = dict(module.named_parameters())
    params = sorted({p for g in groups for p, _ in g.slots if p in named})
    if not params and groups:
        raise ModelpressError("the groups touch no trainable parameters", "score groups of weights")
    return params


def _batches(data: DataSplit, max_batches: int | None, with_labels: bool) -> list[dict[str, torch.Tensor]]:
    items = list(data.batches)[: max_batches or None]
    out = []
    for i, b in enumerate(items):
        b = dict(b)
        if with_labels and data.labels is not None:
            b[_LABEL_KEY] = data.labels[i]
        out.append(b)
    return out


def _seq_len(batches: list[dict[str, torch.Tensor]], names: list[str]) -> int:
    """The longest sequence among the batches' model inputs (their second axis)."""
    return max((int(v.shape[1]) for b in batches for k, v in b.items() if k in names and getattr(v, "ndim", 0) >= 2),
               default=1)


def _single_samples(batches: list[dict[str, torch.Tensor]], limit: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for b in batches:
        n = len(next(iter(b.values())))
        for i in range(n):
            if len(out) >= limit:
                return out
            out.append({k: v[i : i + 1] for k, v in b.items()})
    return out


def _loss(task: Task, teacher: nn.Module, names: list[str], labelled: bool, seed: int) -> Any:
    generator = torch.Generator().manual_seed(seed)

    def loss(output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = primary_output(output)
        if labelled:
            return task.loss(out, None, batch)
        with torch.no_grad():
            ref = primary_output(call_module(teacher, batch, names))
        return task.fisher_loss(out, ref, batch, generator)

    return loss


class _grads_enabled:
    """Temporarily mark every parameter trainable (frozen ones would get no gradient)."""

    def __init__(self, module: nn.Module) -> None:
        self.params = list(module.parameters())
        self.flags = [p.requires_grad for p in self.params]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc: object) -> None:
        for p, f in zip(self.params, self.flags, strict=True):
            p.requires_grad_(f)
