"""Alignment costs: unit features from weights (in the target's units on every other axis) or from
activations on a few hundred samples (standardized per unit), and how the residual stream combines them.

Weights: a unit's feature is every parameter entry it owns (fc1 row and bias, fc2 column; q/k/v rows and
output-projection columns of a head cell; every embedding, LayerNorm and reader entry of a residual
channel), with the tensors' other axes already moved into the target's units by the maps found so far,
so the cost of one group depends on the maps of the groups it reads and writes (the flow through the
model).

Activations: a probe pass (``modelpress.data.probes.collect``) per calibration batch records the inputs and
outputs of every layer that owns a unit's slot: a Linear's output features for its rows, its input features
for its columns, a LayerNorm's input (the residual stream itself), one row per real token (padding, where
the batch has an ``attention_mask``, never counts; batches may be padded to different lengths).
``tokens="first"`` keeps only each sample's first position (a class token), ``max_rows`` subsamples
positions as the batches arrive (:class:`modelpress.data.sampling.RowSample`, seeded per site: the same
rows in every model fed the same batches; at most ``max_rows`` rows per site and one batch are held). Each unit's activations are standardized, so the squared
distance of two units is ``2 (1 - correlation)``.

Residual policies (the stream is one group, so one map; the policy says which sites its cost sees):
``mean`` every site with equal weight (each slot block scaled to unit size), ``weighted`` sites weighted
by their magnitude, ``residual`` only the stream itself (embeddings, norms; no branch writers or readers).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from modelpress.fuse.maps import Aligner, Map
from modelpress.fuse.spaces import Space
from modelpress.graph import ModelGraph
from modelpress.graph.groups import Slot

POLICIES = ("mean", "weighted", "residual")
TOKENS = ("all", "first")
_NORM_NAMES = ("LayerNorm", "RMSNorm", "GroupNorm")


class WeightFeatures:
    """Unit features from weights (see the module)."""

    def __init__(self, graph: ModelGraph, aligner: Aligner, spaces: list[Space], fixed: set[str]) -> None:
        self.state = {k: v.detach() for k, v in graph.state().items()}
        self.aligner = aligner
        self.fixed = fixed
        by_module: dict[str, list] = {}
        for slot, names in aligner.covers.items():
            live = [n for n in names if n not in fixed]
            if live:
                by_module.setdefault(slot[0].rsplit(".", 1)[0], []).append((slot, live))
        self.by_module = by_module

    def stream(self, space: Space, slot: Slot) -> bool:
        if slot in space.inputs:
            return False
        for _, names in self.by_module.get(slot[0].rsplit(".", 1)[0], []):
            if any(n != space.name for n in names):
                return False
        return True

    def usable(self, space: Space, maps: dict[str, Map | None], policy: str) -> list[Slot]:
        """Slots whose tensors' other axes all have maps (and, for the stream under ``residual``, stream slots)."""
        out = []
        for slot in space.positions:
            if space.kind == "embedding" and policy == "residual" and not self.stream(space, slot):
                continue
            names = self.aligner.axis_spaces(slot[0], self.state[slot[0]].dim())
            if all(n in maps for ax, ns in names.items() if ax != slot[1] for n in ns):
                out.append(slot)
        return out

    def __call__(self, space: Space, slots: list[Slot], maps: dict[str, Map | None], policy: str
                 ) -> dict[str, np.ndarray]:
        blocks: dict[str, list[np.ndarray]] = {}
        for slot in slots:
            param, ax = slot
            t = self.state[param]
            shape = list(self.aligner.shapes.get(param, tuple(t.shape)))
            shape[ax] = t.shape[ax]
            at = self.aligner.transform(param, t, maps, skip=space.name, target_shape=tuple(shape))
            pos = space.positions[slot]
            for c in range(pos.shape[1]):
                x = at.index_select(ax, torch.as_tensor(pos[:, c])).movedim(ax, 0).reshape(pos.shape[0], -1)
                x = x.numpy()
                if space.kind == "embedding" and policy == "mean":
                    x = x / (np.sqrt((x**2).mean()) + 1e-12)
                blocks.setdefault(space.role(slot, c), []).append(x)
        return {r: np.concatenate(b, 1) for r, b in blocks.items()}


class ActivationFeatures:
    """Unit features from activations (see the module); collected once per model."""

    def __init__(self, graph: ModelGraph, spaces: list[Space], batches: list, *, tokens: str = "all",
                 max_rows: int = 4096, seed: int = 0) -> None:
        modules = dict(graph.module.named_modules())
        self.sites: dict[tuple[str, Slot], tuple[str, str]] = {}
        wanted: list[str] = []
        for s in spaces:
            if s.fixed:
                continue
            for slot in s.positions:
                owner = slot[0].rsplit(".", 1)[0]
                if owner not in modules or not owner:
                    continue
                mod = modules[owner]
                side = "in" if slot in s.inputs or _is_norm(mod) else "out"
                self.sites[(s.name, slot)] = (owner, side)
                wanted.append(owner)
        self.norm_in = {n for n in wanted if _is_norm(modules[n])}
        rows = token_rows(graph, batches, sorted(set(self.sites.values())), tokens, max_rows=max_rows, seed=seed)
        self.rows: dict[tuple[str, str], torch.Tensor] = {key: x.double() for key, x in rows.items()}

    def stream(self, space: Space, slot: Slot) -> bool:
        site = self.sites.get((space.name, slot))
        return site is not None and (site[0] in self.norm_in or slot not in space.inputs and "embed" in site[0])

    def usable(self, space: Space, maps: dict[str, Map | None], policy: str) -> list[Slot]:
        out = [slot for slot in space.positions if (space.name, slot) in self.sites]
        if space.kind == "embedding" and policy == "residual":
            stream = [slot for slot in out if self.stream(space, slot)]
            out = stream or out
        return out

    def __call__(self, space: Space, slots: list[Slot], maps: dict[str, Map | None], policy: str
                 ) -> dict[str, np.ndarray]:
        blocks: dict[str, list[np.ndarray]] = {}
        seen: set[tuple] = set()
        raw_scale = []
        for slot in slots:
            owner, side = self.sites[(space.name, slot)]
            x = self.rows.get((owner, side))
            if x is None:
                continue
            pos = space.positions[slot]
            for c in range(pos.shape[1]):
                key = (owner, side, tuple(pos[:, c]))
                if key in seen:  # a weight and its bias read the same activations
                    continue
                seen.add(key)
                cols = torch.as_tensor(pos[:, c])
                if int(cols.max()) >= x.shape[1]:
                    continue
                a = x[:, cols].T.numpy()  # [units, rows]
                raw_scale.append(float(np.abs(a).mean()))
                z = (a - a.mean(1, keepdims=True)) / (a.std(1, keepdims=True) + 1e-8) / np.sqrt(a.shape[1])
                blocks.setdefault(space.role(slot, c), []).append((z, raw_scale[-1]))
        out = {}
        mean_scale = float(np.mean(raw_scale)) if raw_scale else 1.0
        for role, parts in blocks.items():
            if space.kind == "embedding" and policy == "weighted":
                out[role] = np.concatenate([z * np.sqrt(s / (mean_scale + 1e-12)) for z, s in parts], 1)
            else:
                out[role] = np.concatenate([z for z, _ in parts], 1)
        return out


def token_rows(graph: ModelGraph, batches: list, sites: list[tuple[str, str]], tokens: str, *,
               max_rows: int | None = None, seed: int = 0) -> dict[tuple[str, str], torch.Tensor]:
    """Per site (module, "in" | "out"): its activation rows over ``batches``, one row per real token
    (at most ``max_rows`` of them, sampled as the batches arrive: site ``i`` of ``sites`` draws with seed
    ``(seed, i)``, so the rows kept depend on the seed and on the row counts, never on the values).

    Each batch is probed on its own, so batches padded to different lengths never meet in one tensor; rows
    of padding (``attention_mask`` 0) are dropped, and ``tokens="first"`` keeps each sample's first position
    (every batch reshaped by its own size, however many samples the data has)."""
    from modelpress.data.probes import collect
    from modelpress.data.sampling import RowSample

    layers = list(dict.fromkeys(name for name, _ in sites))
    samples = {site: RowSample(max_rows, (seed, i)) for i, site in enumerate(sites)}
    for batch in batches:
        stats = collect(graph.module, [batch], layers, {"inputs", "outputs"})
        size, mask = _batch_size_and_mask(batch)
        for name, side in sites:
            x = stats[name].inputs if side == "in" else stats[name].outputs
            if x is not None and x.numel():
                samples[(name, side)].add(_real_tokens(x, size, mask, tokens))
        del stats
    return {site: rows for site, s in samples.items() if (rows := s.rows()) is not None}


def _batch_size_and_mask(batch: dict) -> tuple[int, torch.Tensor | None]:
    """A batch's sample count and its attention mask [samples, positions] as booleans (None without one)."""
    first = next(iter(batch.values()))
    mask = batch.get("attention_mask")
    if mask is None:
        return int(first.shape[0]), None
    mask = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
    return int(mask.shape[0]), mask.reshape(mask.shape[0], -1) != 0


def _real_tokens(x: torch.Tensor, size: int, mask: torch.Tensor | None, tokens: str) -> torch.Tensor:
    """The rows of one batch's activations ``x`` [rows, features] that stand for real tokens (see token_rows).

    With a mask: rows one per token lose the padding's, rows one per position (a position table) the
    positions no sample uses, other rows (a pooled output) pass. Without one, rows that are a multiple of
    the batch size are taken as one per token."""
    per_token = x.shape[0] == mask.numel() if mask is not None else x.shape[0] > size and x.shape[0] % size == 0
    if per_token and tokens == "first":
        return x.reshape(size, -1, x.shape[-1])[:, 0]
    if mask is None:
        return x
    if per_token:
        return x[mask.reshape(-1)]
    if x.shape[0] == mask.shape[1]:
        return x if tokens == "first" else x[mask.any(0)]
    return x


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(_NORM_NAMES)
