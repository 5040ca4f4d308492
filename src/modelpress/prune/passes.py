"""Structured pruning passes over the model graph."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from modelpress.data.saliency import magnitude
from modelpress.graph import Group, ModelGraph
from modelpress.passes import GraphPass, PassConfig, PassResult, register
from modelpress.prune.budget import Kind, round_keep
from modelpress.prune.reconstruction import reconstruct_pruned
from modelpress.reconstruct import DEFAULT_DAMP


class MagnitudeConfig(PassConfig):
    ratios: dict[Kind, float] = Field(default_factory=lambda: {"mlp": 0.5, "head": 0.25})
    round_to: dict[Kind, int] = Field(default_factory=dict)
    min_units: int = Field(1, ge=1)
    allow_output_change: bool = False
    # refit the layers that read removed units to the original's outputs on the calibration split
    # (modelpress.reconstruct: sequential least squares with bias compensation); on by default (see prune.global)
    reconstruct: bool = True
    reconstruct_damp: float = Field(DEFAULT_DAMP, ge=0.0)
    # "scales": one scale per kept input column (Kwon et al.'s mask tuning); "weights": every kept weight
    reconstruct_mode: Literal["scales", "weights"] = "weights"
    # "stream": a residual writer refits to the original stream's value (its own drift and the one upstream)
    reconstruct_target: Literal["stream", "layer"] = "stream"
    # train-split samples added to the calibration rows of the refit: on MiniLM (64 calibration sentences, 986
    # rows for up to 1536 unknowns per output) the full refit overfits without them (held-out cosine 0.44 vs 0.71
    # unrefit); with 512 more, 0.82 (stream target, one iteration at 0.5x latency)
    reconstruct_samples: int = Field(512, ge=0)
    # "all": also refit the layers that read every original input (their inputs drift when earlier layers were
    # pruned; ZipLM and GPTQ refit every layer in order); "readers": only the layers that lost input channels.
    # "all" measured better with no training: MiniLM at 0.5x latency 0.841 (min 0.519) mean cosine against 0.822
    # (0.440); the digits ViT at 75% fewer parameters 0.970 either way (stream target; layer target 0.980 against
    # 0.975); the refit takes ~1.7x longer
    reconstruct_scope: Literal["readers", "all"] = "all"

    def model_post_init(self, __context: object) -> None:
        if "block" in self.ratios or "block" in self.round_to:
            raise ValueError("prune.magnitude removes units of groups, not whole blocks: "
                             "use prune.global with kinds [block]")
        for kind, r in self.ratios.items():
            if not 0.0 <= r < 1.0:
                raise ValueError(f"ratios.{kind} must be in [0, 1), got {r}")
        for kind, n in self.round_to.items():
            if n < 1:
                raise ValueError(f"round_to.{kind} must be >= 1, got {n}")


def units_to_remove(group: Group, scores: np.ndarray, ratio: float, round_to: int = 1, min_units: int = 1) -> list[int]:
    """The lowest-scoring units, so that the kept count is ~(1 - ratio) * size, a multiple of round_to."""
    keep = round_keep(round(group.size * (1.0 - ratio)), group.size, round_to, min_units, nearest=True)
    order = np.argsort(scores, kind="stable")  # ascending: least salient first
    return sorted(int(u) for u in order[: group.size - keep])


@register
class MagnitudePrune(GraphPass):
    """Remove the lowest-magnitude units of every group of the given kinds, at a fixed ratio per kind.

    The baseline that Hessian-aware global pruning is measured against. ``reconstruct``: refit the layers
    that read removed units to the input graph's outputs on the calibration split (modelpress.reconstruct).
    """

    name = "prune.magnitude"
    Config = MagnitudeConfig

    def apply(self, graph: ModelGraph, ctx) -> PassResult:  # noqa: ANN001
        cfg = self.config
        out = graph.copy(share_weights=True)  # the original's weights until the removal replaces them
        before = out.num_parameters()
        plan: list[tuple[str, list[int], int]] = []
        for g in out.groups:
            ratio = cfg.ratios.get(g.kind, 0.0)
            if ratio <= 0 or g.meta.get("fixed"):
                continue
            if not g.prunable and not (cfg.allow_output_change and g.meta.get("at_output")):
                continue
            scores = magnitude(out, g)
            units = units_to_remove(g, scores, ratio, cfg.round_to.get(g.kind, 1), cfg.min_units)
            if units:
                plan.append((g.name, units, g.size))
        removed = {name: len(units) for name, units, _ in plan}
        out.remove_many([(name, units) for name, units, _ in plan], force=cfg.allow_output_change)
        for name, units, size in plan:
            ctx.reporter.log(f"  {name}: {size} -> {size - len(units)}")
        after = out.num_parameters()
        metrics = {"removed_units": removed, "params_before": before, "params_after": after}
        if cfg.reconstruct:
            metrics["reconstruct"] = reconstruct_pruned(graph, out, ctx, cfg.reconstruct_damp, cfg.reconstruct_mode,
                                                        cfg.reconstruct_target, cfg.reconstruct_samples,
                                                        cfg.reconstruct_scope)
        out.own_weights(graph)
        return PassResult(graph=out, metrics=metrics)

