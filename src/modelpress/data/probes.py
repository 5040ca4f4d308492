"""Probes: per-layer statistics collected in one pass over the data, shared by the methods.

``collect(module, batches, layers, stats)`` registers hooks on the named layers, runs the module in eval
mode once per batch (plus one backward when gradients are asked for) and always removes the hooks. What it
can record (``stats``):

* ``"inputs"`` / ``"outputs"``: each layer's input / output activations as float32 rows ``[rows, features]``
  (every position of every sample is a row; the feature axis is the last one, or axis 1 for convolutions
  and batch norms). With ``max_rows`` a uniform random subset of rows is kept, drawn as the batches
  arrive (:class:`modelpress.data.sampling.RowSample`, seeded by ``(seed, i)`` for the ``i``-th layer
  given, the same for its inputs and outputs, so their rows pair when each batch gives both as many).
  Memory: at most ``max_rows`` rows (plus one batch's) per layer and side; without ``max_rows`` every
  row, ``rows x features x 4`` bytes. Used by clipping and activation-based fusion costs.
* ``"xtx"``: ``X^T X`` of each layer's input rows, summed in float64, with the row count: the GPTQ / OBS
  Hessian ``H = X^T X / n`` (:meth:`LayerStatistics.hessian`). For a convolution it is the Gram matrix
  of its input channels, not the im2col Hessian.
* ``"unit_wg"``: for each read-out of ``units`` (name -> :class:`UnitSums`: a set of units, each a set of
  parameter slices), each unit's ``v_u = sum_{s in u} w_s g_s`` per batch, reduced as the gradients arrive
  into ``sum_b v_u``, ``sum_b v_u^2`` and ``sum_b |v_u|`` (float64, :class:`UnitMoments`): NViT's group
  saliency ``E_batches[(sum_{s in S} w_s g_s)^2]`` and first-order Taylor ``E_batches |sum w g|`` for any
  number of groups and batches. ``"unit_fisher"`` adds ``sum_b sum_{s in u} (w_s g_s)^2`` per unit (Optimal
  Brain Damage's ``w^2 E[g^2]`` with one sample per batch). Memory: the units' float64 vectors; each
  parameter's gradient is reduced in its backward hook and dropped before the next one is computed, so a
  pass holds the model and one gradient, whatever the number of batches.
* ``"grad_sq"``: the sum over batches of each squared gradient entry (float64, one tensor per parameter,
  never stored per batch): with one sample per batch it is the per-sample accumulator of the empirical
  Fisher diagonal ``E[g^2]`` (:meth:`Statistics.fisher_diagonal`). Memory: ``numel x 8`` bytes per
  parameter.
* ``"grads"``: every batch's gradient of the parameters ``params`` (default: the probed layers' weights)
  in float32, with a copy of the weights taken before the pass, so group saliencies can be computed for any
  group afterwards (:meth:`Statistics.saliency`). Memory: ``(batches + 1) x numel x 4`` bytes per
  parameter: the reference the reduced statistics are tested against and a tool for small models; methods
  use ``"unit_wg"``.
* ``"per_class"``: per-class mean of each layer's output units, for batches that carry labels
  (``batch[label_key]``, one integer per sample): each sample's output is averaged over its positions,
  then over the samples of each class (float64).

``transform(module, x)`` turns a layer's raw input into what its weight multiplies (a fake-quant layer's
quantized input, say) before ``"inputs"`` and ``"xtx"`` see it. ``stop_after`` names a module after
which each batch's forward is cut short (nothing downstream is needed): inputs-only statistics of the
layers before it for the cost of a partial forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from modelpress.data.sampling import RowSample
from modelpress.errors import ModelpressError
from modelpress.graph.inputs import primary_output
from modelpress.graph.mapped import dropped_after_use
from modelpress.graph.run import call_module
from modelpress.progress import QUIET, Reporter
from modelpress.system import release_freed_memory

__all__ = ["STATS", "LayerStatistics", "Statistics", "UnitMoments", "UnitSums", "collect"]

_XTX_SLICE_BYTES = 16 << 20  # rows summed into X^T X at a time, as float64
STATS = frozenset({"inputs", "outputs", "xtx", "grads", "grad_sq", "unit_wg", "unit_fisher", "per_class"})
_GRAD_STATS = frozenset({"grads", "grad_sq", "unit_wg", "unit_fisher"})
_CHUNK = 1 << 20  # entries of one parameter multiplied in float64 at a time (8 MiB per temporary)

LayerSelection = Sequence[str] | Callable[[str, nn.Module], bool] | None
Transform = Callable[[nn.Module, torch.Tensor], torch.Tensor]
LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class LayerStatistics:
    """What the probe recorded for one layer (fields stay None / empty when not asked for)."""

    inputs: torch.Tensor | None = None  # [rows, features] float32 (subsampled to max_rows)
    outputs: torch.Tensor | None = None  # [rows, units] float32 (subsampled to max_rows)
    xtx: torch.Tensor | None = None  # [features, features] float64, summed over every input row
    rows: int = 0  # input rows summed into xtx (all of them, never subsampled)
    class_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # label -> [units] float64
    class_counts: dict[int, int] = field(default_factory=dict)  # label -> samples

    def hessian(self) -> torch.Tensor:
        """``X^T X / n``: the layer-output error Hessian GPTQ and OBS work with."""
        if self.xtx is None:
            raise ModelpressError(
                "no X^T X was collected for this layer (not asked for, or the layer never ran)",
                'collect with stats={"xtx"} on data that reaches the layer',
            )
        return self.xtx / max(1, self.rows)

    def class_means(self) -> dict[int, torch.Tensor]:
        """Mean output of each unit per class: {label: [units]}."""
        return {c: s / self.class_counts[c] for c, s in sorted(self.class_sums.items())}


@dataclass(frozen=True)
class UnitSums:
    """``size`` units made of parameter slices, for ``"unit_wg"``: each part ``(param, axis, owner)`` gives
    every position ``i`` of ``param``'s ``axis`` to unit ``owner[i]`` (``size`` or more: to none), and a part
    ``(param, None, None)`` gives the whole parameter to unit 0. A unit spans every part that names it (an
    attention head: its query/key/value rows and output-projection columns)."""

    size: int
    parts: tuple[tuple[str, int | None, torch.Tensor | None], ...]


@dataclass
class UnitMoments:
    """Per unit, over batches, of ``v = sum_{s in unit} w_s g_s``: ``sum v``, ``sum v^2``, ``sum |v|``, and
    with ``"unit_fisher"`` ``sum_b sum_{s in unit} (w_s g_s)^2`` (float64 [units])."""

    wg: torch.Tensor
    wg_sq: torch.Tensor
    wg_abs: torch.Tensor
    diag: torch.Tensor | None = None
    batches: int = 0

    def hessian(self) -> torch.Tensor:
        """NViT's ``E_batches[(sum_{s in unit} w_s g_s)^2]``."""
        return self.wg_sq / max(1, self.batches)

    def taylor(self) -> torch.Tensor:
        """First-order Taylor ``E_batches |sum_{s in unit} w_s g_s|``."""
        return self.wg_abs / max(1, self.batches)

    def fisher(self) -> torch.Tensor:
        """``sum_{s in unit} w_s^2 E_batches[g_s^2]`` (the diagonal Fisher; per sample with one-sample batches)."""
        if self.diag is None:
            raise ModelpressError("no diagonal Fisher was collected", "collect with stats={'unit_fisher'}")
        return self.diag / max(1, self.batches)


@dataclass
class Statistics:
    """Everything one :func:`collect` pass recorded."""

    layers: dict[str, LayerStatistics]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # param -> [batches, *param.shape]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # param -> its value during the pass
    grad_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # param -> sum over batches of g^2
    units: dict[str, UnitMoments] = field(default_factory=dict)  # read-out name -> its reduced moments
    batches: int = 0

    def nbytes(self) -> int:
        """Bytes of every tensor this object holds (what a pass keeps between batches)."""
        total = 0
        for d in (self.grads, self.weights, self.grad_sq):
            total += sum(_tensor_bytes(t) for t in d.values())
        for m in self.units.values():
            total += sum(_tensor_bytes(t) for t in (m.wg, m.wg_sq, m.wg_abs, m.diag))
        for st in self.layers.values():
            total += sum(_tensor_bytes(t) for t in (st.inputs, st.outputs, st.xtx))
            total += sum(_tensor_bytes(t) for t in st.class_sums.values())
        return total

    def fisher_diagonal(self, name: str) -> torch.Tensor:
        """``E_batches[g^2]`` of parameter ``name`` (float64); per sample when batches hold one sample."""
        if name not in self.grad_sq:
            raise ModelpressError(
                f"no squared gradients were collected for {name!r}", "collect with stats={'grad_sq'}"
            )
        return self.grad_sq[name] / max(1, self.batches)

    def __getitem__(self, layer: str) -> LayerStatistics:
        return self.layers[layer]

    def group_scores(self, group: Iterable[tuple[str, Any]]) -> torch.Tensor:
        """``sum_{s in group} w_s g_s`` per batch ([batches], float64).

        ``group``: (parameter name, index) pairs; the index selects the group's slice of that parameter
        as tensor indexing does (``slice(0, 8)`` for rows 0-7, ``(slice(None), idx)`` for columns), and
        ``None`` takes the whole parameter. One group may span several parameters (an attention head: its
        query/key/value rows and output-projection columns)."""
        total = torch.zeros(self.batches, dtype=torch.float64)
        for name, index in group:
            if name not in self.grads:
                raise ModelpressError(
                    f"no gradients were collected for {name!r} (have {sorted(self.grads)})",
                    "pass it in params= with stats={'grads'}",
                )
            wg = self.grads[name].double() * self.weights[name].double()
            if index is not None:
                wg = wg[(slice(None), *(index if isinstance(index, tuple) else (index,)))]
            total += wg.reshape(self.batches, -1).sum(dim=1).cpu()
        return total

    def saliency(self, group: Iterable[tuple[str, Any]]) -> float:
        """NViT's group saliency ``E_batches[(sum_{s in group} w_s g_s)^2]`` (see :meth:`group_scores`)."""
        return float(self.group_scores(group).pow(2).mean())


def collect(
    module: nn.Module,
    batches: Iterable[Any],
    layers: LayerSelection = None,
    stats: Iterable[str] = ("xtx",),
    *,
    loss_fn: LossFn | None = None,
    params: Sequence[str] | None = None,
    transform: Transform | None = None,
    max_rows: int | None = None,
    seed: int = 0,
    label_key: str | None = "labels",
    stop_after: str | None = None,
    feature_dims: Mapping[str, int] | None = None,
    units: Mapping[str, UnitSums] | None = None,
    micro_batch: int | None = None,
    reporter: Reporter = QUIET,
) -> Statistics:
    """Run ``module`` once over ``batches`` and return the asked-for statistics of ``layers``.

    ``layers``: module names (in the order subsampling draws them) or a predicate ``(name, module)``.
    ``batches``: dicts of numpy arrays or tensors (passed by keyword, as
    :func:`modelpress.graph.run.call_module` does; ``label_key`` is held back from the module and read
    as labels), tuples (passed positionally) or single tensors. ``loss_fn(output, batch)`` gives the
    scalar whose gradients ``"grads"`` records. ``feature_dims`` overrides a layer's feature axis by name.
    ``units``: the read-outs ``"unit_wg"`` / ``"unit_fisher"`` reduce (their parameters are differentiated
    unless ``params`` names them). ``micro_batch`` (``"unit_wg"`` alone): each batch's gradient is taken
    ``micro_batch`` samples at a time, so the backward holds one micro-batch's activations: the loss is
    computed once on the whole batch's output (a forward without gradients), its gradient with respect to
    that output is cut into micro-batches and pulled back through each micro-batch's forward, and the
    per-unit ``w * g`` sums of the pieces add up to the whole batch's (linear in ``g``; equal up to float32
    round-off of batched versus split forwards). Needs samples that do not interact in the forward (eval
    mode) and outputs whose tensors start with the batch axis; other batches run whole. ``batches`` may
    be a generator: it is consumed once, a batch at a time. See the module docstring for each statistic.
    """
    wanted = _check(stats, loss_fn, stop_after, max_rows, units, micro_batch)
    named = _select_layers(module, layers)
    if wanted - _GRAD_STATS and not named:
        raise ModelpressError(
            f"statistics {sorted(wanted - _GRAD_STATS)} need layers to probe", "name the layers"
        )
    probe = _Probe(named, wanted, transform, dict(feature_dims or {}), max_rows, seed)
    if params is None and units and not wanted & {"grads", "grad_sq"}:
        params = sorted({part[0] for u in units.values() for part in u.parts})
    grad_params = _grad_params(module, named, params) if wanted & _GRAD_STATS else {}
    reducer = _GradReducer(grad_params, wanted, dict(units or {}), probe.result) if grad_params else None
    total = len(batches) if hasattr(batches, "__len__") else None
    release_freed_memory()  # earlier steps' garbage (cut module copies in reference cycles), not under the backward
    # weights mapped from the checkpoint (the original's, shared by a pruned copy) are read by every forward and
    # backward: each layer's leave the resident set once read, so one layer's are resident, not the model's
    with probe.installed(module, stop_after, list(grad_params.values())), _hooked(reducer), \
            dropped_after_use(module) as done:
        if reducer is not None:
            reducer.done = done
        for batch in reporter.track(batches, "collecting statistics", total=total):
            fed, probe.labels = _prepare(module, batch, label_key)
            if "per_class" in wanted and probe.labels is None:
                raise ModelpressError(
                    f"per-class statistics need labels, and a batch has no {label_key!r}",
                    "give labelled batches or drop per_class",
                )
            if reducer is not None:
                if not _split_backward(module, fed, label_key, loss_fn, grad_params, micro_batch):
                    loss = loss_fn(_forward(module, fed, label_key), fed)
                    torch.autograd.backward(loss, inputs=list(grad_params.values()))  # the hooks reduce each grad
                    del loss
                reducer.end_batch()
            else:
                with torch.no_grad():
                    try:
                        _forward(module, fed, label_key)
                    except _Stop:
                        pass
            probe.result.batches += 1
    if reducer is not None:
        reducer.finish()
        release_freed_memory()  # the last backward's activations, freed inside glibc's heap
    probe.finish_rows()
    return probe.result


def _check(
    stats: Iterable[str], loss_fn: LossFn | None, stop_after: str | None, max_rows: int | None,
    units: Mapping[str, UnitSums] | None, micro_batch: int | None = None,
) -> set:
    wanted = set(stats)
    unknown = wanted - STATS
    if unknown:
        raise ModelpressError(f"unknown statistics {sorted(unknown)}", f"choose from {sorted(STATS)}")
    if wanted & _GRAD_STATS and loss_fn is None:
        raise ModelpressError("gradients need a loss", "pass loss_fn=(output, batch) -> scalar tensor")
    if wanted & {"unit_wg", "unit_fisher"} and not units:
        raise ModelpressError("unit statistics need the units to sum over", "pass units={name: UnitSums(...)}")
    if stop_after is not None and wanted & (_GRAD_STATS | {"per_class", "outputs"}):
        raise ModelpressError(
            "stop_after cuts the forward short, so it only serves input statistics", "drop stop_after"
        )
    if max_rows is not None and max_rows < 1:
        raise ModelpressError(f"max_rows must be at least 1, not {max_rows}")
    if micro_batch is not None and (micro_batch < 1 or wanted != {"unit_wg"}):
        raise ModelpressError(
            f"micro_batch={micro_batch} needs a positive size and stats={{'unit_wg'}} alone",
            "the other statistics are not linear in each batch's gradient: drop micro_batch",
        )
    return wanted


def _split_backward(
    module: nn.Module, fed: Any, label_key: str | None, loss_fn: LossFn, params: dict[str, nn.Parameter],
    micro_batch: int | None,
) -> bool:
    """One batch's backward a micro-batch at a time (see :func:`collect`); False, having done nothing, when
    the batch is not larger than ``micro_batch`` or cannot be cut (then it runs whole)."""
    size = _batch_size(fed, label_key)
    if micro_batch is None or size is None or size <= micro_batch:
        return False
    with torch.no_grad():
        leaves, spec = tree_flatten(_forward(module, fed, label_key))
    slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not slots or any(leaves[i].dim() == 0 or leaves[i].shape[0] != size for i in slots):
        return False
    for i in slots:
        leaves[i] = leaves[i].detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(tree_unflatten(leaves, spec), fed)
        outer = torch.autograd.grad(loss, [leaves[i] for i in slots], allow_unused=True)
    used = [(i, g) for i, g in zip(slots, outer, strict=True) if g is not None]
    del loss, leaves, outer
    if not used:
        return False
    for lo in range(0, size, micro_batch):
        part = _rows_of(fed, size, lo, lo + micro_batch)
        out, _ = tree_flatten(_forward(module, part, label_key))
        torch.autograd.backward(
            [out[i] for i, _ in used], [g[lo : lo + micro_batch] for _, g in used], inputs=list(params.values())
        )
        del out
    return True


def _batch_size(fed: Any, label_key: str | None) -> int | None:
    """The sample count of a prepared batch: the first axis its tensors share (None if they do not)."""
    values = [v for k, v in fed.items() if k != label_key] if isinstance(fed, dict) else (
        list(fed) if isinstance(fed, tuple) else [fed])
    sizes = {v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def _rows_of(fed: Any, size: int, lo: int, hi: int) -> Any:
    """Samples ``lo:hi`` of a prepared batch (tensors whose first axis is the batch's; the rest as is)."""
    def cut(v: Any) -> Any:
        return v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v

    if isinstance(fed, dict):
        return {k: cut(v) for k, v in fed.items()}
    if isinstance(fed, tuple):
        return tuple(cut(v) for v in fed)
    return cut(fed)


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class _GradReducer:
    """Backward hooks that reduce each parameter's gradient as soon as it is accumulated, then drop it.

    Per batch it keeps, per (parameter, axis) some read-out uses, the float64 sums of ``w * g`` (and of
    ``(w * g)^2`` for ``"unit_fisher"``) over the other axes: vectors as long as the axis. At the end of the
    batch these are gathered into the units' ``v`` and added to their moments."""

    def __init__(self, params: dict[str, nn.Parameter], wanted: set, units: dict[str, UnitSums],
                 result: Statistics) -> None:
        self.params, self.result = params, result
        self.store, self.square = "grads" in wanted, "grad_sq" in wanted
        self.fisher = "unit_fisher" in wanted
        self.units = units if wanted & {"unit_wg", "unit_fisher"} else {}
        self.axes: dict[str, set[int | None]] = {}
        for key, spec in self.units.items():
            parts = []
            for name, axis, owner in spec.parts:
                if name not in params:
                    raise ModelpressError(f"unit read-out {key!r} names {name!r}, which is not differentiated",
                                          "leave params= out, or include every parameter the units name")
                axis = None if axis is None else axis % max(1, params[name].dim())
                if axis is not None and (owner is None or owner.shape != (params[name].shape[axis],)):
                    raise ModelpressError(f"unit read-out {key!r}: the owner of {name} axis {axis} must have "
                                          f"{params[name].shape[axis]} entries")
                parts.append((name, axis, None if owner is None else owner.long().clamp(0, spec.size).cpu()))
                self.axes.setdefault(name, set()).add(axis)
            self.units[key] = UnitSums(spec.size, tuple(parts))
            zeros = torch.zeros(spec.size, dtype=torch.float64)
            result.units[key] = UnitMoments(zeros.clone(), zeros.clone(), zeros.clone(),
                                            zeros.clone() if self.fisher else None)
        if self.store:
            result.weights = {n: p.detach().clone() for n, p in params.items()}
        self.per_batch: dict[str, list[torch.Tensor]] = {n: [] for n in params} if self.store else {}
        self.sums: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.seen: set[str] = set()
        self.done: Callable[[torch.Tensor], None] = lambda t: None

    def hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def reduce(p: torch.Tensor) -> None:
            g = p.grad.detach()
            p.grad = None
            self.take(name, p.detach(), g)
            self.done(p)  # the backward has read the weight: mapped from a file, it may leave the resident set

        return reduce

    def take(self, name: str, w: torch.Tensor, g: torch.Tensor) -> None:
        self.seen.add(name)
        if self.store:
            self.per_batch[name].append(g.float().cpu())
        if self.square:
            sq = g.double().pow(2).cpu()
            acc = self.result.grad_sq
            acc[name] = acc[name] + sq if name in acc else sq
        if name in self.axes:
            for axis, sums in _axis_sums(w, g, self.axes[name], self.fisher).items():
                held = self.sums.get((name, axis))
                if held is None:
                    self.sums[(name, axis)] = sums
                else:  # another micro-batch of the same batch: the sums are linear in g
                    held[0].add_(sums[0])
                    if held[1] is not None:
                        held[1].add_(sums[1])

    def end_batch(self) -> None:
        for name, p in self.params.items():  # parameters the loss does not reach have a zero gradient
            if name not in self.seen and self.store:
                self.per_batch[name].append(torch.zeros(p.shape, dtype=torch.float32))
        for key, spec in self.units.items():
            v = torch.zeros(spec.size + 1, dtype=torch.float64)
            d = torch.zeros(spec.size + 1, dtype=torch.float64) if self.fisher else None
            for name, axis, owner in spec.parts:
                if (name, axis) not in self.sums:
                    continue
                wg, wg2 = self.sums[(name, axis)]
                if axis is None:
                    v[0] += wg.cpu()[0]
                    if d is not None:
                        d[0] += wg2.cpu()[0]
                else:
                    v.index_add_(0, owner, wg.cpu())
                    if d is not None:
                        d.index_add_(0, owner, wg2.cpu())
            m = self.result.units[key]
            v = v[: spec.size]
            m.wg += v
            m.wg_sq += v * v
            m.wg_abs += v.abs()
            if d is not None:
                m.diag += d[: spec.size]
            m.batches += 1
        self.sums.clear()
        self.seen.clear()

    def finish(self) -> None:
        if self.store:
            self.result.grads = {
                n: torch.stack(gs) if gs else torch.empty(0, *self.params[n].shape) for n, gs in self.per_batch.items()
            }


@contextlib.contextmanager
def _hooked(reducer: _GradReducer | None) -> Iterator[None]:
    """The reducer's hooks on the parameters, their own ``.grad`` put aside; all undone on exit."""
    if reducer is None:
        yield
        return
    saved = {n: p.grad for n, p in reducer.params.items()}
    handles = []
    try:
        for n, p in reducer.params.items():
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(reducer.hook(n)))
        yield
    finally:
        for h in handles:
            h.remove()
        for n, p in reducer.params.items():
            p.grad = saved[n]


def _axis_sums(
    w: torch.Tensor, g: torch.Tensor, axes: set[int | None], squares: bool
) -> dict[int | None, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per axis: the float64 sums of ``w * g`` (and ``(w * g)^2``) over every other axis ([axis length]; axis
    None: the whole sum, [1]). The product is formed in float64 (exact for float32 factors) a chunk of rows
    at a time, so no copy of the whole parameter is made."""
    if w.dim() == 0:
        w, g = w.reshape(1), g.reshape(1)
    out: dict[int | None, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for a in axes:
        n = 1 if a is None else w.shape[a]
        zeros = torch.zeros(n, dtype=torch.float64, device=w.device)
        out[a] = (zeros, zeros.clone() if squares else None)
    step = max(1, _CHUNK // max(1, w[0].numel()))
    for lo in range(0, w.shape[0], step):
        prod = w[lo : lo + step].double() * g[lo : lo + step].double()
        terms = (prod, prod * prod if squares else None)
        for a, acc in out.items():
            for t, into in zip(terms, acc, strict=True):
                if t is None:
                    continue
                if a is None:
                    into += t.sum()
                elif a == 0:
                    into[lo : lo + t.shape[0]] += t.reshape(t.shape[0], -1).sum(1)
                else:
                    into += t.movedim(a, 0).reshape(t.shape[a], -1).sum(1)
    return out


class _Stop(Exception):
    """Raised after ``stop_after`` ran: the rest of the forward is not needed."""


def _raise_stop(*_args: Any) -> None:
    raise _Stop


class _Probe:
    """The hooks of one pass and what they record."""

    def __init__(
        self, named: dict[str, nn.Module], wanted: set, transform: Transform | None, dims: dict[str, int],
        max_rows: int | None = None, seed: int = 0,
    ) -> None:
        self.named, self.wanted, self.transform = named, wanted, transform
        self.dims = {n: dims.get(n, _feature_dim(m)) for n, m in named.items()}
        self.result = Statistics({name: LayerStatistics() for name in named})
        self.inputs = {n: RowSample(max_rows, (seed, i)) for i, n in enumerate(named)}
        self.outputs = {n: RowSample(max_rows, (seed, i)) for i, n in enumerate(named)}
        self.labels: torch.Tensor | None = None

    @contextlib.contextmanager
    def installed(
        self, module: nn.Module, stop_after: str | None, grad_params: list[nn.Parameter]
    ) -> Iterator[None]:
        """Hooks on, module in eval mode, parameters to differentiate trainable; all undone on exit."""
        handles = []
        was_training = module.training
        frozen = [p for p in grad_params if not p.requires_grad]
        try:
            for name, m in self.named.items():
                if self.wanted & {"inputs", "xtx"}:
                    handles.append(m.register_forward_pre_hook(self._input_hook(name), with_kwargs=True))
                if self.wanted & {"outputs", "per_class"}:
                    handles.append(m.register_forward_hook(self._output_hook(name)))
            if stop_after is not None:
                handles.append(_submodule(module, stop_after).register_forward_hook(_raise_stop))
            for p in frozen:
                p.requires_grad_(True)
            module.eval()
            yield
        finally:
            for h in handles:
                h.remove()
            for p in frozen:
                p.requires_grad_(False)
            module.train(was_training)

    def _input_hook(self, name: str) -> Callable:
        st, store, fd = self.result[name], self.inputs[name], self.dims[name]

        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_tensor(args, kwargs)
            with torch.no_grad():
                if self.transform is not None:
                    x = self.transform(m, x)
                x = _rows(x.detach(), fd)
                if "inputs" in self.wanted:
                    store.add(x.float().cpu())
                if "xtx" in self.wanted:
                    if st.xtx is None:
                        st.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                    # in place (no [features, features] temporary per batch) and in slices of rows, so the float64
                    # copy is one slice: a batch of 4096 tokens into BERT-base's last Linear was a 100 MB copy
                    for part in x.split(max(1, _XTX_SLICE_BYTES // (8 * x.shape[1]))):
                        xd = part.double()
                        st.xtx.addmm_(xd.t(), xd)
                    st.rows += x.shape[0]

        return hook

    def _output_hook(self, name: str) -> Callable:
        st, store, fd = self.result[name], self.outputs[name], self.dims[name]

        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            try:
                y = primary_output(out).detach()
            except TypeError:
                raise ModelpressError(f"{name} returns no tensor to record", "probe another layer") from None
            if "outputs" in self.wanted:
                store.add(_rows(y, fd).float().cpu())
            if "per_class" in self.wanted:
                _add_class_sums(name, st, y, fd, self.labels)

        return hook

    def finish_rows(self) -> None:
        """Each layer's sampled rows (an empty [0, 0] tensor where none arrived)."""
        for name, st in self.result.layers.items():
            if "inputs" in self.wanted:
                st.inputs = _rows_or_empty(self.inputs[name])
            if "outputs" in self.wanted:
                st.outputs = _rows_or_empty(self.outputs[name])


def _rows_or_empty(sample: RowSample) -> torch.Tensor:
    rows = sample.rows()
    return torch.empty(0, 0) if rows is None else rows


def _submodule(module: nn.Module, name: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:
        raise ModelpressError(
            f"the model has no module {name!r}", "name modules as model.named_modules() does"
        ) from None


def _select_layers(module: nn.Module, layers: LayerSelection) -> dict[str, nn.Module]:
    if layers is None:
        return {}
    if callable(layers):
        return {n: m for n, m in module.named_modules() if n and layers(n, m)}
    if isinstance(layers, str):
        layers = [layers]
    return {name: _submodule(module, name) for name in dict.fromkeys(layers)}


def _grad_params(
    module: nn.Module, named: dict[str, nn.Module], params: Sequence[str] | None
) -> dict[str, nn.Parameter]:
    """The parameters to differentiate: ``params`` by name, else the probed layers' weights."""
    all_params = dict(module.named_parameters())
    if params is None:
        by_id = {id(p): n for n, p in all_params.items()}
        chosen = [by_id[id(w)] for m in named.values() if id(w := getattr(m, "weight", None)) in by_id]
        if not chosen:
            raise ModelpressError("no parameters to take gradients of", "pass params= (parameter names)")
        return {n: all_params[n] for n in dict.fromkeys(chosen)}
    missing = [n for n in params if n not in all_params]
    if missing:
        raise ModelpressError(
            f"the model has no parameters {missing}", "name them as model.named_parameters() does"
        )
    return {n: all_params[n] for n in dict.fromkeys(params)}


def _feature_dim(m: nn.Module) -> int:
    """Where a layer's features sit: axis 1 for convolutions and batch norms, the last axis otherwise."""
    return 1 if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) else -1


def _rows(x: torch.Tensor, fd: int) -> torch.Tensor:
    """[..., features] rows of ``x`` with its feature axis ``fd`` moved last."""
    if fd not in (-1, x.dim() - 1):
        x = x.movedim(fd, -1)
    return x.reshape(-1, x.shape[-1])


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    raise ModelpressError("a probed layer was called without a tensor input", "probe another layer")


def _add_class_sums(name: str, st: LayerStatistics, y: torch.Tensor, fd: int, labels: torch.Tensor) -> None:
    if y.dim() < 1 or y.shape[0] != labels.shape[0]:
        raise ModelpressError(
            f"{name}'s output {tuple(y.shape)} does not start with the batch axis of {labels.shape[0]} labels",
            "per-class statistics need layers whose output keeps one row per sample",
        )
    per_sample = y.movedim(fd, -1) if fd not in (-1, y.dim() - 1) else y
    per_sample = per_sample.reshape(y.shape[0], -1, per_sample.shape[-1]).double().mean(dim=1).cpu()
    for c in labels.unique().tolist():
        rows = per_sample[labels == c]
        if c in st.class_sums:
            st.class_sums[c] += rows.sum(dim=0)
        else:
            st.class_sums[c] = rows.sum(dim=0)
        st.class_counts[c] = st.class_counts.get(c, 0) + rows.shape[0]


def _prepare(module: nn.Module, batch: Any, label_key: str | None) -> tuple[Any, torch.Tensor | None]:
    """The batch as tensors on the module's device (floats in its dtype), and its labels if any."""
    like = next(module.parameters(), None)
    if isinstance(batch, Mapping):
        fed = {k: _as_tensor(v, like) for k, v in batch.items()}
        labels = fed.get(label_key) if label_key is not None else None
        if isinstance(labels, torch.Tensor):
            return fed, labels.reshape(-1).cpu()
        return fed, None
    if isinstance(batch, (tuple, list)):
        return tuple(_as_tensor(v, like) for v in batch), None
    return _as_tensor(batch, like), None


def _as_tensor(value: Any, like: torch.Tensor | None) -> Any:
    """Arrays and tensors as tensors on the module's device: small ints as int64, floats in its dtype;
    anything else unchanged."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        return value
    if value.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        value = value.to(torch.int64)
    if like is None:
        return value
    if value.is_floating_point() and like.is_floating_point():
        value = value.to(like.dtype)
    return value.to(like.device)


def _forward(module: nn.Module, fed: Any, label_key: str | None) -> Any:
    if isinstance(fed, dict):
        names = [k for k in fed if k != label_key]
        return call_module(module, fed, names)
    if isinstance(fed, tuple):
        return module(*fed)
    return module(fed)
