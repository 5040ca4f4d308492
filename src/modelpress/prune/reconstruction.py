"""Reconstruction after pruning: the prune passes' call into :mod:`modelpress.reconstruct` (one place for the
data it uses and what it reports)."""

from __future__ import annotations

from typing import Any

import torch

from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.graph.run import call_module, primary_output
from modelpress.reconstruct import DEFAULT_DAMP, reconstruct_graph
from modelpress.reconstruct.rearrange import collect_mask_scores, mask_fisher, rearrange, removal_loss

REARRANGED_KINDS = ("head", "mlp", "conv")  # units with one output read by columns (Kwon et al.: heads, filters)


def _calibration(ctx) -> Any:  # noqa: ANN001
    data = ctx.calibration if ctx is not None else None
    if data is None or not data.batches:
        raise ModelpressError("reconstruct and rearrange need calibration data", "give --data, or turn them off")
    return data


def reconstruct_pruned(original: ModelGraph, pruned: ModelGraph, ctx, damp: float = DEFAULT_DAMP,  # noqa: ANN001
                       mode: str = "weights", target: str = "stream", samples: int = 0,
                       scope: str = "all") -> dict:
    """Refit ``pruned``'s readers of removed units to ``original``'s outputs on the Context's calibration split
    (in place), plus up to ``samples`` samples of its train split (more rows than unknowns: a full refit
    overfits a small calibration set). ``mode``: one scale per kept input column, or every kept weight;
    ``target``: ``"stream"`` fits a residual writer to the original stream's value (repairing the drift
    upstream), ``"layer"`` to the original layer's output; ``scope``: ``"all"`` refits every layer in order, ``"readers"``
    only the layers that lost input channels. Returns the per-layer output errors before and
    after, for the pass's metrics."""
    data = ctx.calibration if ctx is not None else None
    if data is None or not data.batches:  # on by default: a run without data prunes without the refit
        if ctx is not None:
            ctx.reporter.log("[yellow]no calibration data: the layers that read removed units are not refit[/yellow]"
                             " (give --data to reconstruct them)")
        return {"skipped": "no calibration data"}
    batches = list(data.batches)
    extra = 0
    if samples > 0:
        train = ctx.train
        for b in ([] if train is None else train.batches):
            if extra >= samples:
                break
            batches.append(b)
            extra += len(next(iter(b.values()))) if isinstance(b, dict) else len(b[0] if isinstance(b, (tuple, list)) else b)
    with ctx.reporter.step("reconstructing the layers that read removed units"):
        out = reconstruct_graph(original, pruned, batches, damp=damp, reporter=ctx.reporter, mode=mode,
                                residual=target == "stream", scope=scope)
    out["train_samples"] = extra
    return out


def rearranged_plan(graph: ModelGraph, plan: dict[str, list[int]], ctx, samples: int = 64,  # noqa: ANN001
                    ) -> tuple[dict[str, list[int]], dict[str, dict[str, float]]]:
    """``plan`` (group -> units to remove) with the units of each head, MLP and conv group re-chosen by Kwon et
    al.'s mask rearrangement (same count per group), from the Monte-Carlo Fisher of the unit masks on up to
    ``samples`` calibration samples (the task's curvature loss against the Context's reference). Returns the new
    plan and, per rearranged group, the loss ``1_S^T F 1_S`` before and after and how many units were swapped."""
    by_name = {g.name: g for g in graph.groups}
    groups = [by_name[n] for n, units in plan.items() if units and by_name[n].kind in REARRANGED_KINDS]
    if not groups:
        return plan, {}
    if ctx.task is None:
        raise ModelpressError("rearrange needs the task (its curvature loss)", "run it inside a pipeline with a task")
    data = _calibration(ctx)
    names = list(graph.input_spec.names)
    single = [{k: v[i : i + 1] for k, v in b.items()} for b in data.batches for i in range(len(next(iter(b.values()))))]
    single = single[:samples]
    teacher = ctx.reference.module if ctx.reference is not None else graph.copy().module
    generator = torch.Generator().manual_seed(ctx.seed)

    def loss(output: torch.Tensor, sample: dict) -> torch.Tensor:
        with torch.no_grad():
            ref = primary_output(call_module(teacher, {n: sample[n] for n in names if n in sample}))
        return ctx.task.fisher_loss(output, ref, sample, generator)

    scores = collect_mask_scores(graph.module, groups, single, loss, names)
    out, report = dict(plan), {}
    for g in groups:
        before = sorted(plan[g.name])
        after = rearrange(scores[g.name], len(before), before)
        fisher = mask_fisher(scores[g.name])
        out[g.name] = after
        report[g.name] = {"loss_before": removal_loss(fisher, before), "loss_after": removal_loss(fisher, after),
                          "swapped": len(set(after) - set(before))}
    return out, report
