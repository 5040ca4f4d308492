"""Optimal-transport fusion of N >= 2 models of one architecture into the anchor's (first model's) units.

``fuse(graphs, settings, batches)``: every model's groups are aligned to the target (the anchor, or the
anchor narrowed to ``settings.width``) by transport maps (``modelpress.fuse.align``), its parameters moved
into the target's units (``modelpress.fuse.maps``), and the aligned models averaged with ``weights``.
A narrower target keeps the anchor's most representative units of each narrowed group (medoids of a
balanced assignment) and merges every other unit of every model into them: fusion doubles as compression.
Also here: vanilla averaging (no alignment, same shapes only) and the parents' output ensemble.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.fuse import align
from modelpress.fuse.features import ActivationFeatures, WeightFeatures
from modelpress.fuse.maps import Aligner, Map
from modelpress.fuse.spaces import WIDTH_KEYS, Space, build_spaces, qk_roles
from modelpress.fuse.transport import couple, distances
from modelpress.graph import ModelGraph
from modelpress.graph.inputs import primary_output
from modelpress.graph.run import call_module
from modelpress.passes import PassConfig
from modelpress.progress import QUIET, Reporter

COSTS = ("weights", "acts")


class FusionSettings(PassConfig):
    """How to align and fuse (see the package docstring for each choice); the ``fuse.ot`` pass's config extends
    it with recovery. ``width``: a narrower target per group kind, a fraction of the anchor (a float at most 1)
    or a unit count (a whole number); ``weights``: one per model (default equal)."""

    alignment: Literal["hard", "soft"] = "hard"
    cost: Literal["acts", "weights"] = "acts"
    qk: Literal["separate", "shared", "per-head"] = "per-head"
    residual: Literal["mean", "weighted", "residual"] = "mean"
    reg: float = Field(default=0.01, gt=0)
    samples: int = Field(default=200, ge=2)
    tokens: Literal["all", "first"] = "all"
    max_rows: int = Field(default=4096, ge=2)
    width: dict[str, int | float] = Field(default_factory=dict)
    weights: list[float] | None = None

    def check(self) -> None:
        """A short error for a width that names no group kind or is not a fraction <= 1 or a unit count."""
        for key, value in self.width.items():
            if key not in WIDTH_KEYS:
                raise ModelpressError(f"unknown width {key!r}", f"use one of {', '.join(WIDTH_KEYS)}, e.g. mlp=0.5")
            if value <= 0:
                raise ModelpressError(f"width {key}={value:g} must be positive", "e.g. mlp=0.5 (a fraction) or mlp=128")
            if isinstance(value, float) and value > 1:
                raise ModelpressError(f"width {key}={value:g} is wider than the anchor (a fraction above 1)",
                                      f"the target can only be narrower: a fraction <= 1 ({key}=0.5) or a whole "
                                      f"unit count ({key}=128)")


@dataclass
class Fusion:
    """A fusion's result: the fused graph, vanilla averaging (None when shapes differ), the maps, the normalized
    weights (the ensemble's too)."""

    graph: ModelGraph
    vanilla: ModelGraph | None
    maps: list[dict[str, Map | None]]
    widths: dict[str, tuple[int, int]]  # group -> (anchor units, target units), narrowed groups only
    output_maps: list[torch.Tensor | None] = field(default_factory=list)
    seconds: float = 0.0
    roles: dict[str, Any] = field(default_factory=dict)
    weights: list[float] = field(default_factory=list)


def check_models(graphs: list[ModelGraph]) -> None:
    """Two or more models of one architecture (same inputs, depth, groups and head widths; other widths may
    differ); else one short line saying how the models differ."""
    if len(graphs) < 2:
        raise ModelpressError(f"fusion needs two or more models, got {len(graphs)}", "give at least two checkpoints")
    for other in graphs[1:]:
        problem = _difference(graphs[0], other)
        if problem:
            raise ModelpressError(f"{other.name} and {graphs[0].name} differ: {problem}",
                                  "fuse models of one architecture (only head counts, MLP and stream widths may differ)")


def _difference(anchor: ModelGraph, other: ModelGraph) -> str | None:
    """How ``other`` differs from ``anchor`` in what fusion needs equal, or None."""
    a, b = anchor.input_spec, other.input_spec
    if (a.kind, list(a.names)) != (b.kind, list(b.names)) or a.kind == "image" and a.shape != b.shape:
        return f"inputs {b.kind} {list(b.names)} {b.shape or ''} vs {a.kind} {list(a.names)} {a.shape or ''}"
    if len(other.blocks) != len(anchor.blocks):
        return f"depth {len(other.blocks)} vs {len(anchor.blocks)} blocks"
    mine, theirs = {g.name: g for g in anchor.groups}, {g.name: g for g in other.groups}
    if set(mine) != set(theirs):
        extra = sorted(set(mine).symmetric_difference(theirs))
        return f"groups {', '.join(extra[:3])} are in one model only"
    for name, g in mine.items():
        if g.kind != theirs[name].kind:
            return f"group {name} is {theirs[name].kind} vs {g.kind}"
        if g.kind == "head_dim" and g.size != theirs[name].size:
            return f"head width of {name}: {theirs[name].size} vs {g.size} (fusion keeps the anchor's head width)"
    params = set(anchor.state()).symmetric_difference(other.state())
    if params:
        return f"parameters {', '.join(sorted(params)[:3])} are in one model only"
    return None


def target_widths(anchor: list[Space], width: dict[str, int | float]) -> dict[str, int]:
    """Units per narrowed space of the target (``width``: a fraction <= 1, or a whole count), never wider."""
    out = {}
    for s in anchor:
        if s.fixed or s.kind not in width:
            continue
        value = width[s.kind]
        k = int(round(value * s.units)) if isinstance(value, float) else int(value)
        if k > s.units or isinstance(value, float) and value > 1:
            raise ModelpressError(f"target width {s.kind}={value:g} ({k} units) is wider than the anchor's "
                                  f"{s.name} ({s.units} units)", "the target can only be as wide as the anchor or narrower")
        if k < 1:
            raise ModelpressError(f"target width {s.kind}={value:g} leaves no unit of {s.name}", "use a larger width")
        if k < s.units:
            out[s.name] = k
    return out


def normalized_weights(weights: list[float] | None, n: int) -> np.ndarray:
    """One non-negative weight per model, summing to 1 (default equal); else a short error."""
    w = np.asarray(weights or [1.0] * n, dtype=np.float64)
    if len(w) != n or (w < 0).any() or w.sum() <= 0:
        raise ModelpressError(f"fusion weights {list(w)} do not fit {n} models", "one non-negative weight per model")
    return w / w.sum()


def fuse(graphs: list[ModelGraph], settings: FusionSettings, batches: list | None = None, *, seed: int = 0,
         reporter: Reporter = QUIET) -> Fusion:
    """Fuse ``graphs`` (the first is the anchor) into one model (see the module): a narrower target's units
    first, then the anchor's maps into the target, every other model's maps, and the weighted average."""
    started = time.perf_counter()
    settings.check()
    check_models(graphs)
    weights = normalized_weights(settings.weights, len(graphs))
    if settings.cost == "acts" and not batches:
        raise ModelpressError("activation costs need data", "give the run data, or use cost=weights")
    anchor = graphs[0]
    anchor_spaces = build_spaces(anchor)
    roles = {s.name: s.roles for s in anchor_spaces if s.roles}
    spaces = [anchor_spaces] + [build_spaces(g, qk_roles(anchor, anchor_spaces)) for g in graphs[1:]]
    features = Features(graphs, spaces, settings, batches or [], seed, reporter)
    keep = kept_units(anchor, anchor_spaces, features, settings)
    target = _narrowed(anchor, keep)
    target_spaces = build_spaces(target, roles)
    shapes = {k: tuple(v.shape) for k, v in target.state().items()}
    aligners = [Aligner(spaces[i], target_spaces, shapes) for i in range(len(graphs))]
    a_feats = features.of(0, aligners[0])
    a_maps = anchor_maps(anchor_spaces, a_feats, keep, settings)
    barycenters = TargetFeatures(anchor_spaces, a_maps, a_feats, settings.residual)
    all_maps = [a_maps]
    for i in range(1, len(graphs)):
        with reporter.step(f"aligning {graphs[i].name} to {anchor.name} ({settings.alignment}, {settings.cost})"):
            all_maps.append(model_maps(spaces[i], features.of(i, aligners[i]), barycenters, target_spaces, settings))
    fused = averaged(graphs, target, aligners, all_maps, weights)
    return Fusion(fused, vanilla_average(graphs, weights), all_maps,
                  {n: (_units(anchor_spaces, n), _units(target_spaces, n)) for n in keep},
                  output_maps(graphs, spaces, target_spaces, all_maps), time.perf_counter() - started, roles,
                  [float(w) for w in weights])


class Features:
    """Unit features of each model: from weights (in an aligner's target units, fresh for every aligner) or from
    activations (probed once per model and kept)."""

    def __init__(self, graphs: list[ModelGraph], spaces: list[list[Space]], settings: FusionSettings, batches: list,
                 seed: int, reporter: Reporter) -> None:
        self.graphs, self.spaces, self.settings = graphs, spaces, settings
        self.batches, self.seed, self.reporter = batches, seed, reporter
        self.fixed = {s.name for s in spaces[0] if s.fixed}
        self._acts: dict[int, ActivationFeatures] = {}

    def of(self, i: int, aligner: Aligner) -> WeightFeatures | ActivationFeatures:
        """Model ``i``'s features (weights seen through ``aligner``, or its activations)."""
        s = self.settings
        if s.cost == "weights":
            return WeightFeatures(self.graphs[i], aligner, self.spaces[i], self.fixed)
        if i not in self._acts:
            with self.reporter.step(f"activations of {self.graphs[i].name} on {s.samples} samples"):
                self._acts[i] = ActivationFeatures(self.graphs[i], self.spaces[i], self.batches, tokens=s.tokens,
                                                   max_rows=s.max_rows, seed=self.seed)
        return self._acts[i]


class TargetFeatures:
    """The target's unit features per space and slot set: barycenters of the anchor's features under its maps
    (computed once per key). Spaces are looked up by name among the anchor's: another model's space may have
    other unit counts (parents of different widths)."""

    def __init__(self, spaces: list[Space], anchor_maps: dict[str, Map | None], anchor_features: Any,
                 policy: str) -> None:
        self.spaces = {s.name: s for s in spaces}
        self.maps, self.feats, self.policy = anchor_maps, anchor_features, policy
        self._cache: dict[tuple, dict[str, np.ndarray]] = {}

    def __call__(self, name: str, slots: list) -> dict[str, np.ndarray]:
        key = (name, tuple(slots))
        if key not in self._cache:
            feats = self.feats(self.spaces[name], slots, self.maps, self.policy)
            self._cache[key] = align.barycenters(self.maps[name], feats)
        return self._cache[key]


def kept_units(anchor: ModelGraph, spaces: list[Space], features: Features, settings: FusionSettings
               ) -> dict[str, np.ndarray]:
    """For a narrower target: the anchor units each narrowed space keeps (features in the anchor's own units)."""
    narrowed = target_widths(spaces, settings.width)
    if not narrowed:
        return {}
    own = Aligner(spaces, spaces, {k: tuple(v.shape) for k, v in anchor.state().items()})
    feats = features.of(0, own)
    identity: dict[str, Map | None] = {s.name: None for s in spaces}
    policy = settings.residual
    keep = {}
    for s in spaces:
        if s.name in narrowed:
            f = feats(s, feats.usable(s, identity, policy), identity, policy)
            keep[s.name], _ = align.narrow(s, f, narrowed[s.name], settings)
    return keep


def _narrowed(anchor: ModelGraph, keep: dict[str, np.ndarray]) -> ModelGraph:
    """A copy of the anchor holding only the kept units of each narrowed group."""
    target = anchor.copy()
    if keep:
        target.remove_many([(name, sorted(set(range(target.group(name).size)) - set(units.tolist())))
                            for name, units in keep.items()])
    return target


def anchor_maps(spaces: list[Space], feats: Any, keep: dict[str, np.ndarray], settings: FusionSettings
                ) -> dict[str, Map | None]:
    """The anchor's maps into the target: identity, or onto the kept units of a narrowed space."""
    maps: dict[str, Map | None] = {s.name: None for s in spaces if s.fixed}
    for _ in range(align.rounds(settings.cost, spaces)):
        for s in align.order(spaces):
            if s.name not in keep:
                maps[s.name] = Map.identity(s.size)
                continue
            f = feats(s, feats.usable(s, maps, settings.residual), maps, settings.residual)
            maps[s.name] = _narrow_map(s, f, keep[s.name], settings)
    return maps


def model_maps(spaces: list[Space], feats: Any, target_features: TargetFeatures, target: list[Space],
               settings: FusionSettings) -> dict[str, Map | None]:
    """One model's maps into the target, in flow order (each cost sees the maps found before it)."""
    tspace = {s.name: s for s in target}
    maps: dict[str, Map | None] = {s.name: None for s in spaces if s.fixed}
    for _ in range(align.rounds(settings.cost, spaces)):
        for s in align.order(spaces):
            slots = feats.usable(s, maps, settings.residual)
            src = align.role_features(s, feats(s, slots, maps, settings.residual), settings.qk)
            tgt = align.role_features(s, target_features(s.name, slots), settings.qk)
            maps[s.name] = align.plan(s, src, tgt, tspace[s.name], settings)
    return maps


def averaged(graphs: list[ModelGraph], target: ModelGraph, aligners: list[Aligner],
             maps: list[dict[str, Map | None]], weights: np.ndarray) -> ModelGraph:
    """Every model moved into the target's units and averaged with ``weights`` (float64, then the target dtype)."""
    fused = target.copy()
    with torch.no_grad():
        for name, t in fused.state().items():
            if not t.is_floating_point():
                continue
            acc = torch.zeros(t.shape, dtype=torch.float64)
            for i, g in enumerate(graphs):
                acc += weights[i] * aligners[i].transform(name, g.state()[name], maps[i])
            t.data.copy_(acc.to(t.dtype))
    fused.name = "fused"
    return fused


def _units(spaces: list[Space], name: str) -> int:
    return next(s.units for s in spaces if s.name == name)


def _narrow_map(s: Space, feats: dict[str, np.ndarray], keep: np.ndarray, settings: FusionSettings) -> Map:
    every = np.concatenate([feats[r] for r in sorted(feats)], 1)
    if s.kind == "head" and s.head_dim:
        hd = s.head_dim
        cols = np.concatenate([np.arange(j * hd, (j + 1) * hd) for j in keep])
        return Map({"all": align.per_head(distances(every, every[cols]), s.heads, len(keep), hd, settings.alignment,
                                          settings.reg)})
    return Map({"all": couple(distances(every, every[keep]), settings.alignment, settings.reg)})


def vanilla_average(graphs: list[ModelGraph], weights: np.ndarray) -> ModelGraph | None:
    """Plain weighted averaging of the parameters, no alignment (None when the models' shapes differ)."""
    states = [g.state() for g in graphs]
    if any(tuple(s[k].shape) != tuple(states[0][k].shape) for s in states[1:] for k in states[0]):
        return None
    out = graphs[0].copy()
    with torch.no_grad():
        for name, t in out.state().items():
            if t.is_floating_point():
                t.data.copy_(sum(w * s[name].double() for w, s in zip(weights, states, strict=True)).to(t.dtype))
    out.name = "vanilla"
    return out


def output_maps(graphs: list[ModelGraph], spaces: list[list[Space]], target: list[Space],
                maps: list[dict[str, Map | None]]) -> list[torch.Tensor | None]:
    """Per model: the matrix moving its output's last axis into the target's units (models whose output is
    the residual stream, e.g. encoders); None when the output is fixed (a classifier's classes)."""
    out: list[torch.Tensor | None] = []
    groups = {g.name: g for g in graphs[0].groups}
    at_output = [s.name for s in target if not s.fixed and groups[s.name].meta.get("at_output")]
    for i in range(len(graphs)):
        m = maps[i].get(at_output[0]) if at_output else None
        out.append(None if m is None else m.matrix("all", input_side=False).float())
    return out


class Ensemble(nn.Module):
    """The parents' output ensemble, weighted by ``weights`` (the fusion's: default equal): weighted mean of
    softmax probabilities (returned as log-probabilities, logits for every loss and metric) for classifiers,
    else the weighted mean output with each parent's output moved into the anchor's units (``output_maps``)."""

    def __init__(self, modules: list[nn.Module], names: list[str], classify: bool,
                 output_maps: list[torch.Tensor | None] | None = None, weights: list[float] | None = None):
        super().__init__()
        self.parents = nn.ModuleList(modules)
        self.names = list(names)
        self.classify = classify
        self.maps = list(output_maps or [None] * len(modules))
        w = torch.tensor(weights or [1.0] * len(modules), dtype=torch.float32)
        self.register_buffer("weights", w / w.sum(), persistent=False)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, m in enumerate(self.parents):
            y = primary_output(call_module(m, inputs, self.names)).float()
            if self.classify:
                y = torch.softmax(y, dim=-1)
            elif self.maps[i] is not None:
                y = y @ self.maps[i].T
            outs.append(self.weights[i] * y)
        total = torch.stack(outs).sum(0)
        return torch.log(total.clamp_min(1e-12)) if self.classify else total
