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
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.fuse import align
from modelpress.fuse.features import POLICIES, TOKENS, ActivationFeatures, WeightFeatures
from modelpress.fuse.maps import Aligner, Map
from modelpress.fuse.spaces import WIDTH_KEYS, Space, build_spaces, qk_roles
from modelpress.fuse.transport import ALIGNMENTS
from modelpress.graph import ModelGraph
from modelpress.graph.inputs import primary_output
from modelpress.graph.run import call_module
from modelpress.progress import QUIET, Reporter

COSTS = ("weights", "acts")


@dataclass(frozen=True)
class FusionSettings:
    """How to align and fuse (see the package docstring for each choice)."""

    alignment: str = "hard"
    cost: str = "acts"
    qk: str = "per-head"
    residual: str = "mean"
    reg: float = 0.01
    samples: int = 200
    tokens: str = "all"
    max_rows: int = 4096
    width: tuple[tuple[str, float], ...] = ()
    weights: tuple[float, ...] | None = None

    def check(self) -> None:
        for value, allowed, what in ((self.alignment, ALIGNMENTS, "alignment"), (self.cost, COSTS, "cost"),
                                     (self.qk, align.QK_MODES, "qk"), (self.residual, POLICIES, "residual"),
                                     (self.tokens, TOKENS, "tokens")):
            if value not in allowed:
                raise ModelpressError(f"unknown {what} {value!r}", f"use one of {', '.join(allowed)}")
        for key, value in self.width:
            if key not in WIDTH_KEYS:
                raise ModelpressError(f"unknown width {key!r}", f"use one of {', '.join(WIDTH_KEYS)}, e.g. mlp=0.5")
            if value <= 0:
                raise ModelpressError(f"width {key}={value:g} must be positive", "e.g. mlp=0.5 (a fraction) or mlp=128")
        if self.samples < 2 or self.max_rows < 2:
            raise ModelpressError("activation costs need at least 2 samples and rows", "e.g. samples=200")


@dataclass
class Fusion:
    """A fusion's result: the fused graph, vanilla averaging (None when shapes differ), the maps."""

    graph: ModelGraph
    vanilla: ModelGraph | None
    maps: list[dict[str, Map | None]]
    widths: dict[str, tuple[int, int]]  # group -> (anchor units, target units), narrowed groups only
    output_maps: list[torch.Tensor | None] = field(default_factory=list)
    seconds: float = 0.0
    roles: dict[str, Any] = field(default_factory=dict)


def check_models(graphs: list[ModelGraph]) -> None:
    """Two or more models of one architecture (same groups, parameters and inputs); else a short error."""
    if len(graphs) < 2:
        raise ModelpressError(f"fusion needs two or more models, got {len(graphs)}", "give at least two checkpoints")
    anchor = graphs[0]
    kinds = {g.name: g.kind for g in anchor.groups}
    params = set(anchor.state())
    for other in graphs[1:]:
        if other.input_spec.names != anchor.input_spec.names or other.input_spec.kind != anchor.input_spec.kind:
            raise ModelpressError(f"{other.name} takes other inputs ({other.input_spec.names}) than "
                                  f"{anchor.name} ({anchor.input_spec.names})", "fuse models of one task and architecture")
        theirs = {g.name: g.kind for g in other.groups}
        if set(other.state()) != params or theirs != kinds:
            diff = sorted(set(theirs).symmetric_difference(kinds) or set(other.state()).symmetric_difference(params))
            raise ModelpressError(f"{other.name} differs from {anchor.name} in depth or kind of layers ({diff[:3]})",
                                  "fuse models of one architecture (they may differ only in widths)")


def target_widths(anchor: list[Space], width: dict[str, float]) -> dict[str, int]:
    """Units per narrowed space of the target (``width``: a fraction <= 1, or a count), never wider."""
    out = {}
    for s in anchor:
        if s.fixed or s.kind not in width:
            continue
        value = width[s.kind]
        k = int(round(value * s.units)) if value <= 1 else int(value)
        if k > s.units or value > 1 and value != int(value):  # a fraction above 1 asks for a wider target
            raise ModelpressError(f"target width {s.kind}={value:g} ({k} units) is wider than the anchor's "
                                  f"{s.name} ({s.units} units)", "the target can only be as wide as the anchor or narrower")
        if k < 1:
            raise ModelpressError(f"target width {s.kind}={value:g} leaves no unit of {s.name}", "use a larger width")
        if k < s.units:
            out[s.name] = k
    return out


def fuse(graphs: list[ModelGraph], settings: FusionSettings, batches: list | None = None, *, seed: int = 0,
         reporter: Reporter = QUIET) -> Fusion:
    """Fuse ``graphs`` (the first is the anchor) into one model (see the module)."""
    started = time.perf_counter()
    settings.check()
    check_models(graphs)
    weights = np.asarray(settings.weights or [1.0] * len(graphs), dtype=np.float64)
    if len(weights) != len(graphs) or (weights < 0).any() or weights.sum() <= 0:
        raise ModelpressError(f"fusion weights {list(weights)} do not fit {len(graphs)} models",
                              "one non-negative weight per model")
    weights = weights / weights.sum()
    if settings.cost == "acts" and not batches:
        raise ModelpressError("activation costs need data", "give the run data, or use cost=weights")
    anchor = graphs[0]
    anchor_spaces = build_spaces(anchor)
    roles = {s.name: s.roles for s in anchor_spaces if s.roles}
    spaces = [anchor_spaces] + [build_spaces(g, qk_roles(anchor, anchor_spaces)) for g in graphs[1:]]
    fixed = {s.name for s in anchor_spaces if s.fixed}
    narrowed = target_widths(anchor_spaces, dict(settings.width))
    cfg = align.Settings(settings.alignment, settings.reg, settings.qk, settings.residual)
    policy = settings.residual

    def extractor(i: int, aligner: Aligner) -> Any:
        if settings.cost == "weights":
            return WeightFeatures(graphs[i], aligner, spaces[i], fixed)
        if i not in acts_cache:
            with reporter.step(f"activations of {graphs[i].name} on {settings.samples} samples"):
                acts_cache[i] = ActivationFeatures(graphs[i], spaces[i], batches, samples=settings.samples,
                                                   tokens=settings.tokens, max_rows=settings.max_rows, seed=seed)
        return acts_cache[i]

    acts_cache: dict[int, ActivationFeatures] = {}
    # 1. a narrower target: which anchor units it keeps (features in the anchor's own units)
    own = Aligner(anchor_spaces, anchor_spaces, {k: tuple(v.shape) for k, v in anchor.state().items()})
    keep: dict[str, np.ndarray] = {}
    if narrowed:
        feats = extractor(0, own)
        identity: dict[str, Map | None] = {s.name: None for s in anchor_spaces}
        for s in anchor_spaces:
            if s.name in narrowed:
                keep[s.name], _ = align.narrow(s, feats(s, feats.usable(s, identity, policy), identity, policy),
                                               narrowed[s.name], cfg)
    target = anchor.copy()
    if keep:
        plan = []
        for name, units in keep.items():
            drop = sorted(set(range(target.group(name).size)) - set(units.tolist()))
            plan.append((name, drop))
        target.remove_many(plan)
    target_spaces = build_spaces(target, roles)
    shapes = {k: tuple(v.shape) for k, v in target.state().items()}
    aligners = [Aligner(spaces[i], target_spaces, shapes) for i in range(len(graphs))]
    tspace = {s.name: s for s in target_spaces}

    # 2. the anchor's maps into the target (identity unless narrowed)
    a_feats = extractor(0, aligners[0])
    a_maps: dict[str, Map | None] = {s.name: None for s in anchor_spaces if s.fixed}
    for _ in range(align.rounds(settings.cost, anchor_spaces)):
        for s in align.order(anchor_spaces):
            if s.name not in keep:
                a_maps[s.name] = Map.identity(s.size)
                continue
            f = a_feats(s, a_feats.usable(s, a_maps, policy), a_maps, policy)
            a_maps[s.name] = _narrow_map(s, f, keep[s.name], cfg)
    cache: dict[tuple, dict[str, np.ndarray]] = {}

    def target_features(s: Space, slots: list) -> dict[str, np.ndarray]:
        key = (s.name, tuple(slots))
        if key not in cache:
            cache[key] = align.barycenters(a_maps[s.name], a_feats(s, slots, a_maps, policy))
        return cache[key]

    # 3. every other model's maps, in flow order
    all_maps = [a_maps]
    for i in range(1, len(graphs)):
        feats = extractor(i, aligners[i])
        maps: dict[str, Map | None] = {s.name: None for s in spaces[i] if s.fixed}
        with reporter.step(f"aligning {graphs[i].name} to {anchor.name} ({settings.alignment}, {settings.cost})"):
            for _ in range(align.rounds(settings.cost, spaces[i])):
                for s in align.order(spaces[i]):
                    slots = feats.usable(s, maps, policy)
                    src = align.role_features(s, feats(s, slots, maps, policy), settings.qk)
                    tgt = align.role_features(s, target_features(s, slots), settings.qk)
                    maps[s.name] = align.plan(s, src, tgt, tspace[s.name], cfg)
        all_maps.append(maps)

    # 4. move every model into the target's units and average
    fused = target.copy()
    fused_state = fused.state()
    with torch.no_grad():
        for name, t in fused_state.items():
            if not t.is_floating_point():
                continue
            acc = torch.zeros(t.shape, dtype=torch.float64)
            for i, g in enumerate(graphs):
                moved = aligners[i].transform(name, g.state()[name], all_maps[i])
                acc += weights[i] * moved
            t.data.copy_(acc.to(t.dtype))
    fused.name = "fused"
    return Fusion(fused, vanilla_average(graphs, weights), all_maps,
                  {n: (_units(anchor_spaces, n), tspace[n].units) for n in keep},
                  output_maps(graphs, spaces, target_spaces, all_maps), time.perf_counter() - started, roles)


def _units(spaces: list[Space], name: str) -> int:
    return next(s.units for s in spaces if s.name == name)


def _narrow_map(s: Space, feats: dict[str, np.ndarray], keep: np.ndarray, cfg: align.Settings) -> Map:
    every = np.concatenate([feats[r] for r in sorted(feats)], 1)
    from modelpress.fuse.transport import couple, distances

    if s.kind == "head" and s.head_dim:
        hd = s.head_dim
        cols = np.concatenate([np.arange(j * hd, (j + 1) * hd) for j in keep])
        return Map({"all": align.per_head(distances(every, every[cols]), s.heads, len(keep), hd, cfg.alignment,
                                          cfg.reg)})
    return Map({"all": couple(distances(every, every[keep]), cfg.alignment, cfg.reg)})


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
    """The parents' output ensemble: mean of softmax probabilities (returned as log-probabilities, logits for
    every loss and metric) for classifiers, else the mean output with each parent's output moved into the
    anchor's units (``output_maps``)."""

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
