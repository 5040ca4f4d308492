"""Sequential reconstruction: refit the reader layers of a pruned model one after another, in forward order.

For each reader (a layer whose input channels were removed: an attention output projection after head
removal, an MLP's second Linear after hidden-unit removal, a convolution after input-channel removal, every
Linear reading the residual stream after residual-channel removal), hooks on BOTH models record, on the same
calibration batches, the pruned model's input to the layer (computed by the pruned layers before it, already
refit, as GPTQ does, so errors do not compound unseen) and the original model's input to its layer (the target
is the original layer's output on it, computed batch by batch). Each forward stops at the layer (a hook
raises): the rest is not needed. Only one stage's statistics are held at a time
(:class:`~modelpress.reconstruct.solve.PairStats`: a ``k x k`` Gram of the ``k`` kept inputs and a ``k x m``
cross term per layer of ``m`` outputs, float64), never a copy of the rows per batch. Padding tokens (the
batch's ``attention_mask``) are left out of the rows.

Layers that read the same input tensor (the query, key and value projections after one norm) form one stage:
one pair of partial forwards per batch collects their shared statistics.

Staged runs (GPTQ's and ZipLM's order), so the time grows linearly with depth: when a model runs a chain of
blocks (the children of a ``ModuleList`` or ``Sequential``, each called once per forward, each fed the one
before's output and otherwise the same arguments: found by one forward with hooks), both models keep, per
calibration batch, the input of the block the refit has reached (with the block's other arguments: attention
masks, position embeddings). A stage's forwards start there, run that block (and the next one when the residual
stream a layer writes into is read there) and stop at the layer; once every stage of a block is refit, both
streams advance through it (one block forward per batch) and its inputs are dropped. Memory: one block input per
batch for each model (``2 x rows x width`` floats: for MiniLM, 2048 sentences of up to 128 tokens at width 384,
at most 0.8 GB; calibration sets of long LM sequences are bounded the same way) on top of one stage's statistics.
Layers outside the chain (embeddings, a pooler, a head) and models without one run from the model's inputs, as
before; both orders give the same refit up to float rounding (the blocks compute the same operations).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.graph.mapped import drop_mapped_weights, dropped_after_use, file_mappings_frozen
from modelpress.graph.run import as_tensors, call_module
from modelpress.progress import QUIET, Reporter
from modelpress.reconstruct import layers as L  # noqa: N812
from modelpress.reconstruct.maps import LayerMap
from modelpress.reconstruct.solve import DEFAULT_DAMP, PairStats, UnderdeterminedRefit, refit

__all__ = ["LayerResult", "reconstruct_layers", "residual_consumer"]

_PLAIN = (type(None), bool, int, float, str)


@dataclass
class LayerResult:
    """What reconstruction did to one layer: relative output error on the calibration rows before and after,
    whether the refit was applied, and notes (why not, damping, no bias)."""

    error_before: float
    error_after: float
    applied: bool
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"error_before": self.error_before, "error_after": self.error_after, "applied": self.applied,
                **({"notes": self.notes} if self.notes else {})}


class _Stop(Exception):
    """Raised by a hook once the last input a stage needs was recorded."""


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError("layer called without a tensor")


def _run(module: nn.Module, batch: Any, names: Sequence[str] | None) -> None:
    """One forward of ``module`` on ``batch`` without autograd, stopped by a hook (or run to the end)."""
    like = next(module.parameters(), None)
    if isinstance(batch, Mapping):
        keys = list(names) if names is not None else [k for k in batch if k != "labels"]
        fed: Any = as_tensors(batch, keys, like)
    elif isinstance(batch, torch.Tensor):
        fed = batch.to(like.device) if like is not None else batch
    else:
        fed = tuple(v.to(like.device) if isinstance(v, torch.Tensor) and like is not None else v for v in batch)
    with torch.no_grad():
        try:
            call_module(module, fed, list(fed) if isinstance(fed, dict) else None)
        except _Stop:
            pass


def _order(module: nn.Module, names: Sequence[str], batch: Any, input_names: Sequence[str] | None) -> dict[str, tuple]:
    """For each named layer that runs on ``batch``: (call index of its first call, calls, identity of its
    input tensor), from one full forward on the batch's first sample. The inputs are held until the end, so
    a freed tensor's address cannot be reused by another and pass for the same input."""
    seen: dict[str, list] = {}
    held: list[torch.Tensor] = []
    handles = []

    def hook(name: str):  # noqa: ANN202
        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_tensor(args, kwargs)
            if name in seen:
                seen[name][1] += 1
            else:
                seen[name] = [len(seen), 1, (x.data_ptr(), tuple(x.shape), tuple(x.stride()))]
                held.append(x)
        return pre

    for n in names:
        handles.append(module.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True))
    try:
        _run(module, _first_sample(batch), input_names)
    finally:
        for h in handles:
            h.remove()
    held.clear()
    return {n: tuple(v) for n, v in seen.items()}


def residual_consumer(module: nn.Module, name: str, batch: Any, input_names: Sequence[str] | None = None,
                      ) -> str | None:
    """The module whose input is ``name``'s output plus another tensor (the residual stream it writes into:
    BERT's LayerNorm after the sum, a pre-norm block's next norm), found by probing: a perturbation added to
    the layer's output reaches that module's input unchanged, and its input is not the layer's output itself
    (a dropout in between). None when no module reads such a sum (the output is not added to a stream)."""
    sample = _first_sample(batch)
    return _probe_consumer(module, name, lambda: _run(module, sample, input_names))


def _probe_consumer(module: nn.Module, name: str, run: Callable[[], None]) -> str | None:
    """:func:`residual_consumer` with ``run`` doing the forward (the whole model, or a replay of blocks)."""
    order: list[str] = []
    seen: dict[str, torch.Tensor] = {}
    state = {"after": False, "out": None, "delta": None}
    handles = []
    target = module.get_submodule(name)

    def out_hook(_m: nn.Module, _args: tuple, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or state["after"]:
            return None
        state["after"] = True
        if state["delta"] is not None:
            out = out + state["delta"]
        state["out"] = out.detach()
        return out

    def pre(key: str):  # noqa: ANN202
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if not state["after"] or key in seen:
                return
            try:
                x = _first_tensor(args, kwargs)
            except TypeError:
                return
            if state["out"] is not None and x.shape != state["out"].shape:
                return  # not the stream the layer's output has the shape of (no copy)
            seen[key] = x.detach().clone()
            order.append(key)
        return hook

    handles.append(target.register_forward_hook(out_hook))
    for n, m in module.named_modules():
        if n and n != name and not n.startswith(name + "."):
            handles.append(m.register_forward_pre_hook(pre(n), with_kwargs=True))
    try:
        run()
        base, y = dict(seen), state["out"]
        if y is None:
            return None
        gen = torch.Generator(device="cpu").manual_seed(0)
        delta = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device) * (y.abs().mean() + 1e-3)
        seen.clear()
        order_base = list(order)
        order.clear()
        state.update(after=False, out=None, delta=delta)
        run()
    finally:
        for h in handles:
            h.remove()
    for key in order_base:
        a, b = base.get(key), seen.get(key)
        if a is None or b is None or a.shape != y.shape or b.shape != y.shape:
            continue
        if torch.allclose(a, y, atol=1e-6, rtol=1e-5):
            continue  # the layer's own output (a dropout, an identity): not yet the sum
        if torch.allclose(b - a, delta, atol=1e-4 * float(delta.abs().max()) + 1e-6, rtol=1e-3):
            return key
    return None


def _first_out(out: Any) -> torch.Tensor | None:
    """A block's stream output: the tensor it returns, or the first item of a tuple (HF layers)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _is_cache(v: Any) -> bool:
    """A key-value cache object (transformers' ``*Cache``): filled by every call, so replays get None."""
    return type(v).__name__.endswith("Cache")


def _replayable(v: Any) -> bool:
    if isinstance(v, (torch.Tensor, *_PLAIN)) or _is_cache(v):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, (torch.Tensor, *_PLAIN)) for x in v)


def _same(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, _PLAIN) and type(a) is type(b) and a == b)


@dataclass
class _Chain:
    """Blocks a model runs one after another: their paths in call order and where the stream enters each call
    (a positional index or a keyword)."""

    paths: list[str]
    slot: int | str


def _chain_slot(calls: Mapping[str, tuple], paths: Sequence[str]) -> int | str | None:
    """Where each block of ``paths`` reads the previous block's output, if every block reads it at the same
    place and gets the first block's other arguments (the same objects); None when they do not chain."""
    slot: int | str | None = None
    args0, kwargs0, _ = calls[paths[0]]
    for prev, cur in zip(paths[:-1], paths[1:], strict=True):
        y = _first_out(calls[prev][2])
        args, kwargs, _ = calls[cur]
        if y is None or len(args) != len(args0) or set(kwargs) != set(kwargs0):
            return None
        where = [i for i, v in enumerate(args) if v is y] + [k for k, v in kwargs.items() if v is y]
        if len(where) != 1 or (slot is not None and where[0] != slot):
            return None
        slot = where[0]
        others = [(a, b) for i, (a, b) in enumerate(zip(args, args0, strict=True)) if i != slot]
        others += [(kwargs[k], kwargs0[k]) for k in kwargs if k != slot]
        if not all(_same(a, b) and _replayable(a) for a, b in others):
            return None
    if slot is None:
        return None
    first = args0[slot] if isinstance(slot, int) else kwargs0.get(slot)
    return slot if isinstance(first, torch.Tensor) else None


def _find_chain(module: nn.Module, batch: Any, input_names: Sequence[str] | None) -> _Chain | None:
    """The longest chain of blocks (children of a ``ModuleList`` / ``Sequential`` of at least 2) that one
    forward on the batch's first sample runs in order, each once, each on the previous one's output."""
    containers = [(p, m) for p, m in module.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1]
    calls: dict[str, list] = {}
    order: list[str] = []
    handles = []

    def hook(path: str):  # noqa: ANN202
        def post(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            calls.setdefault(path, []).append((args, kwargs, out))
            order.append(path)
        return post

    paths_of = {}
    for cpath, cont in containers:
        paths_of[cpath] = [f"{cpath}.{i}" if cpath else str(i) for i in range(len(cont))]
        for p, child in zip(paths_of[cpath], cont, strict=True):
            handles.append(child.register_forward_hook(hook(p), with_kwargs=True))
    try:
        _run(module, _first_sample(batch), input_names)
    finally:
        for h in handles:
            h.remove()
    best: _Chain | None = None
    for paths in paths_of.values():
        if any(len(calls.get(p, ())) != 1 for p in paths):
            continue
        at = [order.index(p) for p in paths]
        if at != sorted(at):
            continue
        slot = _chain_slot({p: calls[p][0] for p in paths}, paths)
        if slot is not None and (best is None or len(paths) > len(best.paths)):
            best = _Chain(paths, slot)
    return best


def _drop_after(module: nn.Module, _args: tuple, _out: Any) -> None:
    """Forward hook: the block has run; its mapped weights leave the resident set (the output is unchanged)."""
    drop_mapped_weights(module)


class _Runner:
    """Runs one model on the calibration batches until a hook stops it: from the model's inputs, or, with a
    chain of blocks, from the cached inputs of the block the refit has reached (:meth:`advance`)."""

    def __init__(self, module: nn.Module, batches: list, input_names: Sequence[str] | None,
                 chain: _Chain | None) -> None:
        self.module, self.batches, self.input_names, self.chain = module, batches, input_names, chain
        self.blocks = [] if chain is None else [module.get_submodule(p) for p in chain.paths]
        self.at: int | None = None  # the block whose inputs ``cache`` holds
        self.cache: list[tuple[list, dict] | None] = []  # per batch, then for the first sample alone
        self.block_runs = 0  # block forwards started from the cache (for tests: linear in depth)

    def block_of(self, path: str) -> int | None:
        """The chain block holding ``path`` (the block itself or a module inside it)."""
        if self.chain is None:
            return None
        for i, p in enumerate(self.chain.paths):
            if path == p or path.startswith(p + "."):
                return i
        return None

    def _capture(self) -> None:
        box: dict[str, tuple] = {}

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            box["in"] = (list(args), {k: None if _is_cache(v) else v for k, v in kwargs.items()})
            raise _Stop

        h = self.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
        try:  # the batches, then the first sample alone (the residual-consumer probes run on it)
            for batch in [*self.batches, _first_sample(self.batches[0])]:
                box.clear()
                _run(self.module, batch, self.input_names)
                found = box.get("in")
                if found is not None:
                    found = ([None if _is_cache(v) else v for v in found[0]], found[1])
                self.cache.append(found)
        finally:
            h.remove()
        self.at = 0

    def _call(self, j: int, inputs: tuple[list, dict]) -> tuple[list, dict]:
        """Block ``j`` on ``inputs``; the next block's inputs (its output in the stream's place)."""
        args, kwargs = inputs
        self.block_runs += 1
        y = _first_out(self.blocks[j](*args, **kwargs))
        slot = self.chain.slot
        if isinstance(slot, int):
            return [y if i == slot else v for i, v in enumerate(args)], kwargs
        return args, {**kwargs, slot: y}

    def advance(self, path: str) -> None:
        """Move the cached inputs up to the block holding ``path`` (every block before it is final)."""
        k = self.block_of(path)
        if k is None:
            return
        if self.at is None:
            self._capture()
        with torch.no_grad():
            while self.at < k:
                self.cache = [None if c is None else self._call(self.at, c) for c in self.cache]
                self.at += 1
                # final: its weights mapped from a checkpoint (the original's) need not stay resident
                drop_mapped_weights(self.blocks[self.at - 1])

    def run(self, i: int, stop: str) -> None:
        """Batch ``i`` until the hook on ``stop`` (or at any hook that raises) stops it."""
        k = self.block_of(stop)
        if self.at is None or k is None or k < self.at or self.cache[i] is None:
            with self._dropping():
                _run(self.module, self.batches[i], self.input_names)
            return
        self._replay(i, k)

    @contextlib.contextmanager
    def _dropping(self) -> Iterator[None]:
        """Around a whole forward (a layer after the chain: a pooler, a head, a residual consumer there): each
        block's weights mapped from a checkpoint leave the resident set once it has run, so they are not all
        resident at once."""
        hooks = [b.register_forward_hook(_drop_after) for b in self.blocks]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def _replay(self, i: int, last: int) -> None:
        inputs = self.cache[i]
        with torch.no_grad():
            try:
                for j in range(self.at, min(last, len(self.blocks) - 1) + 1):
                    inputs = self._call(j, inputs)
            except _Stop:
                pass

    def consumer(self, name: str) -> str | None:
        """:func:`residual_consumer` of ``name``, probed on the first sample from the cached inputs of its block
        (through that block and the next: whatever the block writes reaches the next block's input) when it
        lies in the chain; else (or, in the last block, not found there) from the model's inputs, on the
        first sample."""
        k = self.block_of(name)
        if self.at is not None and k == self.at and self.cache[-1] is not None:
            found = _probe_consumer(self.module, name, lambda: self._replay(len(self.cache) - 1, k + 1))
            if found is not None or k + 1 < len(self.blocks):
                return found
        with self._dropping():
            return residual_consumer(self.module, name, self.batches[0], self.input_names)


def _first_sample(batch: Any) -> Any:
    """The batch cut to its first sample (tensors and arrays with a leading batch axis)."""
    def cut(v: Any) -> Any:
        return v[:1] if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim else v
    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(cut(v) for v in batch)
    return cut(batch)


def _stages(order_p: dict, order_o: dict, maps: Mapping[str, LayerMap]) -> list[list[str]]:
    """Readers in the pruned model's forward order, consecutive ones sharing an input (in both models, with the
    same kept channels) grouped into one stage."""
    names = sorted(maps, key=lambda n: order_p[n][0])
    stages: list[list[str]] = []
    for n in names:
        prev = stages[-1][-1] if stages else None
        if (prev is not None and order_p[n][2] == order_p[prev][2]
                and order_o[maps[n].original][2] == order_o[maps[prev].original][2]
                and np.array_equal(maps[n].inputs, maps[prev].inputs)):
            stages[-1].append(n)
        else:
            stages.append([n])
    return stages


def _valid_rows(batch: Any, x: torch.Tensor, rows: int) -> torch.Tensor | None:
    """Which of a ``[batch, seq, features]`` input's rows are real tokens (the batch's ``attention_mask``), so
    padding does not weigh in the fit; None for any other layout (every row counts)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape) or rows != x.shape[0] * x.shape[1]:
        return None
    return torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).reshape(-1).to(x.device) > 0


def _target(omod: nn.Module, outs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The original layer's outputs ``X W^T + b`` on its input rows, at the kept outputs (float64)."""
    w = L.matrix(omod)[outs.to(rows.device)].double()
    y = rows.double() @ w.t()
    b = L.bias_of(omod)
    return y if b is None else y + b[outs.to(b.device)].double()


def _collect(ro: _Runner, rp: _Runner | None, first: str, opath: str, kept_cols: np.ndarray,
             layers: list[tuple[str, nn.Module, torch.Tensor]],
             consumers: tuple[str, str] | None = None) -> dict[str, PairStats]:
    """The statistics of one stage (``layers``: name, original layer, kept outputs; all reading one input): per
    batch, the original's input to ``omod`` (turned into each layer's target outputs) and the pruned model's
    input to ``first`` (each forward stopped there); with ``pruned`` None, the original's kept columns stand
    for the pruned input (the independent variant). The input moments are summed once and shared. ``ro`` /
    ``rp``: the runners of the original and the pruned model (``rp`` None: the independent variant)."""
    original, pruned = ro.module, None if rp is None else rp.module
    omod = original.get_submodule(opath)
    pmod = omod if pruned is None else pruned.get_submodule(first)
    box: dict[str, torch.Tensor] = {}
    out: dict[str, PairStats] = {}

    def grab(key: str, mod: nn.Module):  # noqa: ANN202
        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_tensor(args, kwargs).detach()
            box[key] = L.rows(mod, x)
            box[key + ":shape"] = x
            raise _Stop
        return pre

    def keep(key: str, stop: bool):  # noqa: ANN202
        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if key not in box:
                box[key] = _first_tensor(args, kwargs).detach()
            if stop:
                raise _Stop
        return pre

    def keep_out(key: str):  # noqa: ANN202
        def post(_m: nn.Module, _args: tuple, out: Any) -> None:
            if key not in box and isinstance(out, torch.Tensor):
                box[key] = out.detach()
        return post

    residual = consumers is not None and pruned is not None
    for bi, batch in enumerate(ro.batches):
        if residual:  # run on to the module reading the sum: the stream the layer writes into
            hs = [omod.register_forward_pre_hook(keep("orig:x", False), with_kwargs=True),
                  original.get_submodule(consumers[1]).register_forward_pre_hook(keep("orig:sum", True),
                                                                                 with_kwargs=True)]
        else:
            hs = [omod.register_forward_pre_hook(grab("orig", omod), with_kwargs=True)]
        try:
            ro.run(bi, consumers[1] if residual else opath)
        finally:
            for h in hs:
                h.remove()
        if residual:
            hs = [pmod.register_forward_pre_hook(keep("pruned:x", False), with_kwargs=True),
                  pmod.register_forward_hook(keep_out("pruned:y")),
                  pruned.get_submodule(consumers[0]).register_forward_pre_hook(keep("pruned:sum", True),
                                                                               with_kwargs=True)]
            try:
                rp.run(bi, consumers[0])
            finally:
                for h in hs:
                    h.remove()
            if "orig:x" in box and "pruned:x" in box:
                box["orig"], box["orig:shape"] = L.rows(omod, box["orig:x"]), box["orig:x"]
                box["pruned"] = L.rows(pmod, box["pruned:x"])
        elif pruned is not None:
            h = pmod.register_forward_pre_hook(grab("pruned", pmod), with_kwargs=True)
            try:
                rp.run(bi, first)
            finally:
                h.remove()
        xo, shaped = box.pop("orig", None), box.pop("orig:shape", None)
        xp = box.pop("pruned", None) if pruned is not None else (
            None if xo is None else xo[:, torch.as_tensor(kept_cols, device=xo.device)])
        stream = None
        if residual and xo is not None and all(k in box for k in ("orig:sum", "pruned:sum", "pruned:y")):
            # the target the pruned layer should write: the original stream's value minus what the pruned
            # model's stream already holds (its residual), so the layer also repairs the drift upstream
            held = box["pruned:sum"] - box["pruned:y"]
            stream = (box["orig:sum"], held)
        box.clear()
        if xo is None or xp is None:
            continue  # a batch that does not reach the layer
        if xo.shape[0] != xp.shape[0]:
            raise ValueError(f"{first}: {xp.shape[0]} pruned rows against {xo.shape[0]} original rows")
        valid = None if isinstance(omod, nn.Conv2d) else _valid_rows(batch, shaped, xo.shape[0])
        if valid is not None:
            xo, xp = xo[valid], xp[valid]
        xp = xp.to(xo.device)
        for i, (name, lmod, outs) in enumerate(layers):
            if name not in out:
                shared = next(iter(out.values()), None)
                fresh = PairStats.zeros(len(kept_cols), len(outs), device=xo.device)
                if shared is not None:  # one input: share its moments
                    fresh.gram, fresh.sum_pruned = shared.gram, shared.sum_pruned
                out[name] = fresh
            if stream is not None and len(layers) == 1:
                o = outs.to(xo.device)
                whole, held = (t.reshape(-1, t.shape[-1]) for t in stream)
                if valid is not None:
                    whole, held = whole[valid], held[valid]
                y = whole[:, o].double() - held.double()
            else:
                y = _target(lmod, outs, xo)
            out[name].add(xp, y, inputs=i == 0)
    first_stats = next(iter(out.values()), None)
    for st in out.values():
        st.rows = first_stats.rows
    return out


def reconstruct_layers(
    original_module: nn.Module,
    pruned_module: nn.Module,
    layer_map: Mapping[str, LayerMap],
    batches: Iterable[Any],
    *,
    input_names: Sequence[str] | None = None,
    damp: float = DEFAULT_DAMP,
    intercept: bool = True,
    sequential: bool = True,
    add_bias: Callable[[str], None] | None = None,
    reporter: Reporter = QUIET,
    mode: str = "weights",
    residual: bool = False,
    staged: bool = True,
) -> dict[str, LayerResult]:
    """Refit every layer of ``layer_map`` (pruned path -> :class:`LayerMap`) in ``pruned_module``, in place, so
    that its output on the calibration ``batches`` matches its original in ``original_module``.

    ``batches``: dicts of input tensors (``input_names`` picks the model inputs; else every key but
    ``labels``), tuples or tensors. ``sequential=False`` refits every layer on the ORIGINAL model's inputs
    (its kept columns: the independent per-layer variant, the structured-OBS update; the pruned model is not
    run and later layers do not see earlier edits or refits).
    ``damp`` / ``intercept``: see :func:`modelpress.reconstruct.solve.refit`. ``add_bias(path)``: gives a
    bias-less Linear or Conv2d a zero bias (``ModelGraph.add_bias``, recorded for reloading), called only when
    the refit with an intercept is applied; without it such layers are refit with their bias fixed at none
    (noted). ``staged``: run block by block from cached block inputs when the model has a chain of blocks
    (see the module docstring; the same refit, in time linear in depth); False re-runs both models from their
    inputs up to every layer. Returns a
    :class:`LayerResult` per layer; a layer that never runs on the batches is left out.
    """
    batches = list(batches)
    if not layer_map or not batches:
        return {}
    was = (original_module.training, pruned_module.training)
    original_module.eval()
    pruned_module.eval()
    try:
        with file_mappings_frozen():  # a drop after every block of every forward: mappings read once
            # whole-model probes: each layer's weights mapped from the checkpoint leave the resident set once read
            with dropped_after_use(original_module), dropped_after_use(pruned_module):
                order_p = _order(pruned_module, list(layer_map), batches[0], input_names)
                order_o = _order(original_module, sorted({m.original for m in layer_map.values()}), batches[0],
                                 input_names)
                maps = {n: m for n, m in layer_map.items() if n in order_p and m.original in order_o}
                stages = _stages(order_p, order_o, maps)
                chain_p = _find_chain(pruned_module, batches[0], input_names) if staged and sequential else None
                chain_o = _find_chain(original_module, batches[0], input_names) if staged else None
            if chain_o is not None:  # those forwards read every weight; the runners read them block by block
                drop_mapped_weights(original_module)
                drop_mapped_weights(pruned_module)
            ro = _Runner(original_module, batches, input_names, chain_o)
            rp = _Runner(pruned_module, batches, input_names, chain_p) if sequential else None
            results: dict[str, LayerResult] = {}
            with _one_warning_for_underdetermined():
                _refit_stages(stages, results, maps, order_p, order_o, original_module, pruned_module, ro, rp,
                              residual, damp, intercept, add_bias, mode, reporter)
            return results
    finally:
        original_module.train(was[0])
        pruned_module.train(was[1])


@contextlib.contextmanager
def _one_warning_for_underdetermined() -> Iterator[None]:
    """The refits' :class:`UnderdeterminedRefit` warnings (one per layer: a 1B model's prune printed over a
    hundred) gathered into one, with how many calibration rows an exact refit needs; other warnings pass."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnderdeterminedRefit)
        yield
    under = [w for w in caught if issubclass(w.category, UnderdeterminedRefit)]
    for w in caught:
        if w not in under:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if under:
        need = max(getattr(w.message, "need", 0) for w in under)
        first = str(under[0].message).split(": the refit")[0]
        warnings.warn(UnderdeterminedRefit(
            f"{len(under)} layer refit{'s' if len(under) > 1 else ''} had fewer calibration rows than unknowns per "
            f"output ({first}; the widest needs {need}): damped, not exact. Give more calibration samples "
            "(rows are tokens or positions) for exact refits", need), stacklevel=3)


def _refit_stages(stages: list[list[str]], results: dict[str, LayerResult], maps: Mapping[str, LayerMap],  # noqa: PLR0913
                  order_p: dict, order_o: dict, original_module: nn.Module, pruned_module: nn.Module, ro: _Runner,
                  rp: _Runner | None, residual: bool, damp: float, intercept: bool,
                  add_bias: Callable[[str], None] | None, mode: str, reporter: Reporter) -> None:
    """Refit every stage in order (:func:`reconstruct_layers`' loop), filling ``results``."""
    for stage in reporter.track(stages, "reconstructing layers", total=len(stages)):
        first = stage[0]
        pmod = pruned_module.get_submodule(first)
        many = [n for n in stage if order_p[n][1] > 1 or order_o[maps[n].original][1] > 1]
        for n in many:
            results[n] = LayerResult(0.0, 0.0, False, ["called more than once per forward: not refit"])
        todo = [n for n in stage if n not in many]
        if not todo:
            continue
        kept_cols = L.columns(pmod, maps[first].inputs)
        layers = [(n, original_module.get_submodule(maps[n].original),
                   torch.as_tensor(maps[n].outputs, dtype=torch.long)) for n in todo]
        ro.advance(maps[first].original)
        if rp is not None:
            rp.advance(first)
        consumers = None
        if residual and rp is not None and len(todo) == 1:
            cp, co = rp.consumer(first), ro.consumer(maps[first].original)
            consumers = (cp, co) if cp is not None and co is not None else None
        stats = _collect(ro, rp, first, maps[first].original, kept_cols, layers, consumers)
        for n in todo:
            if n not in stats:
                continue  # the batches never reached it
            results[n] = _refit_one(n, pruned_module.get_submodule(n), stats[n], damp, intercept, add_bias, mode)
            reporter.log(f"  reconstructed {n}: output error {results[n].error_before:.4g} -> "
                         f"{results[n].error_after:.4g}{'' if results[n].applied else ' (kept)'}")
        del stats


def _refit_one(name: str, pmod: nn.Module, stats: PairStats, damp: float, intercept: bool,
               add_bias: Callable[[str], None] | None, mode: str = "weights") -> LayerResult:
    current = L.matrix(pmod)
    bias = L.bias_of(pmod)
    new_bias = intercept and bias is None and add_bias is not None and L.can_add_bias(pmod)
    if new_bias:
        bias = torch.zeros(current.shape[0], dtype=current.dtype)  # what a zero bias gives: the same function
    fit = refit(stats, current, bias, damp=damp, intercept=intercept, name=name, mode=mode)
    notes = list(fit.notes)
    if fit.applied:
        if new_bias:
            add_bias(name)
            notes.append("bias added (bias compensation)")
        L.set_matrix(pmod, fit.weight, fit.bias)
    return LayerResult(fit.error_before, fit.error_after, fit.applied, notes)
