"""``prune.classwise`` as a recipe pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelpress.graph import ModelGraph
from modelpress.passes import GraphPass, PassResult, register
from modelpress.prune.classwise.config import ClasswiseConfig
from modelpress.prune.classwise.result import ClasswiseResult
from modelpress.prune.classwise.split import classwise_split


@register
class ClasswisePrune(GraphPass):
    """ED-ViT class-wise split: K class-subset sub-models, each pruned and recovered on its subset's data,
    fused, and placed on devices. Returns the input graph unchanged; the split goes to ``classwise/``."""

    name = "prune.classwise"
    Config = ClasswiseConfig

    def apply(self, graph: ModelGraph, ctx) -> PassResult:  # noqa: ANN001
        result = classwise_split(graph, ctx.data, ctx.task, self.config, target=ctx.target, seed=ctx.seed,
                                 reporter=ctx.reporter, latency_model=getattr(ctx, "latency_model", None))
        out = Path(ctx.workdir) / "classwise"
        result.save(out)
        ctx.extras.setdefault("artifacts", {})["classwise"] = out
        return PassResult(graph=graph, metrics={"classwise": summary(result)})


def summary(result: ClasswiseResult) -> dict[str, Any]:
    """What the split produced, for the run's report and table: each sub-model's size and latency on its
    device beside the full model's (measured in the same run), the combined accuracy beside the full
    model's, and the placement."""
    report = result.report
    combined, full = report["combined"], report["full"]
    subs = []
    for s in result.sub_models:
        device = s.info["device"]
        mine, theirs = s.info["latency_ms"][device], full["latency_ms"].get(device)
        subs.append({"name": s.name, "classes": s.classes, "params": s.info["params"],
                     "params_reduction": s.info["params_reduction"], "device": device, "latency_ms": mine,
                     "full_latency_ms": theirs, "speedup": theirs / mine if theirs and mine > 0 else None})
    return {
        "output": "classwise/",
        "subsets": result.subsets,
        "full": {"params": full["params"], "latency_ms": full["latency_ms"]},
        "sub_models": subs,
        "combined": {"metric": combined["metric"], "full_model": combined["full_model"],
                     "concat": combined["concat"][combined["metric"]],
                     "fusion": combined["fusion"][combined["metric"]]},
        "placement": {"loads_ms": result.assignment.loads_ms, "makespan_ms": result.assignment.makespan_ms},
    }
