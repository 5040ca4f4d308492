"""``prune.fuse_blocks``: remove whole blocks one at a time, recycling each into its neighbours (FuseGPT)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.passes import GraphPass, PassConfig, PassResult, register
from modelpress.prune.blocks.fusion import (
    finetune_group,
    fold,
    neighbours,
    remove_with_learnable_fusion,
    remove_with_merge,
    tunable_group,
)
from modelpress.prune.blocks.importance import Importance, block_scores


class FuseBlocksConfig(PassConfig):
    # fraction of the removable blocks to remove (rounded to the nearest count, at least one)
    target_blocks: float = Field(0.25, gt=0.0, lt=1.0)
    # what to reach: the block fraction above, or keep at most ``ratio`` of the parameters or of the latency the
    # Context's latency model predicts (blocks removed one at a time until it is met)
    target: Literal["blocks", "params", "latency"] = "blocks"
    ratio: float | None = Field(None, gt=0.0, lt=1.0)
    # mi: Macro Influence, re-scored after every removal; block-influence (ShortGPT), kl (output KL of removing
    # each block alone) and hessian (prune.global's block saliency): scored once
    importance: Importance = "mi"
    # learned: FuseGPT's low-rank-weighted injection + group distillation; merge: LaCo-style averaging; none
    fusion: Literal["learned", "merge", "none"] = "learned"
    # FuseGPT's group: the authors' default --group-size 8 counts the removed block, so 7 neighbours (fewer
    # where the container has fewer blocks)
    neighbours: int = Field(7, ge=0)
    # per removed block. 100: 2 of 6 blocks removed, the stdlib Llama's next-token KL 0.00043 against 0.0035 at 30
    # steps (plain recovery of direct removal with the same 200 steps: 0.00050), MiniLM 0.916 against 0.909 mean cosine
    finetune_steps: int = Field(100, ge=0)
    lr: float = Field(1e-3, gt=0.0)
    rank: int = Field(8, ge=1)  # of the fusion coefficient matrices (the authors use 128 on 4096-wide LLaMA)
    # the authors' group tuning beside the fusion coefficients: the neighbours' norms and biases and a low-rank delta
    # on each neighbour matrix (folded into the dense weights), at their own learning rate (1e-3: the best of 1e-4,
    # 3e-4, 1e-3 on MiniLM and of 1e-5, 1e-4, 1e-3 on the stdlib Llama, 30 steps per block, benchmarks/block_pruning.py).
    # On by default: 2 of 6 blocks removed, MiniLM 0.909 mean cosine with it against 0.873 without, the stdlib Llama
    # next-token KL 0.0035 against 0.031; the digits ViT the same accuracy either way
    tune_group: bool = True
    group_rank: int = Field(8, ge=1)
    group_lr: float = Field(1e-3, gt=0.0)
    # the group distillation loss: mse (normalized MSE of the group's output hidden state) or kl-batch (the authors'
    # KL of hidden states softmaxed over the batch axis)
    loss: Literal["mse", "kl-batch"] = "mse"
    merge_coefficient: float = Field(0.5, ge=0.0, le=1.0)
    calibration_batches: int = Field(4, ge=1)


def _calibration(graph: ModelGraph, ctx: Any, n: int) -> list[dict[str, torch.Tensor]]:
    split = ctx.calibration
    if split is not None and split.batches:
        return list(split.batches[:n])
    seq = 16 if graph.input_spec.kind == "text" else None
    return [graph.example_inputs(4, seq, seed=ctx.seed + i) for i in range(n)]


def _task(graph: ModelGraph, ctx: Any) -> Any:
    if ctx.task is not None:
        return ctx.task
    from modelpress.data.tasks import infer_task

    return infer_task(graph.input_spec, graph.module)


def _goal(cfg: FuseBlocksConfig, graph: ModelGraph, ctx: Any) -> tuple[Any, float]:
    """The cost to bring down (parameters, or the latency model's prediction) and its goal; (None, 0) for a
    block-fraction target."""
    if cfg.target == "blocks":
        return None, 0.0
    if cfg.ratio is None:
        raise ModelpressError(f"a {cfg.target} target needs ratio (the fraction of the {cfg.target} to keep)",
                              "add ratio, e.g. ratio: 0.75")
    if cfg.target == "params":
        def cost(g: ModelGraph) -> float:
            return float(g.num_parameters())
    else:
        model = getattr(ctx, "latency_model", None)
        if model is None:
            raise ModelpressError("a latency target needs a latency model on the Context",
                                  "build one with `modelpress bench --latency-table CKPT`, or use target params")

        def cost(g: ModelGraph) -> float:
            return float(model.predict(g))
    return cost, cfg.ratio * cost(graph)


@register
class FuseBlocks(GraphPass):
    """Remove ``target_blocks`` of the blocks, the least important first (Macro Influence by default, re-scored
    after every removal), fusing each removed block into its ``neighbours`` nearest kept blocks (FuseGPT) and
    folding what was learned into their dense weights: the result has plain block removal's architecture."""

    name = "prune.fuse_blocks"
    Config = FuseBlocksConfig

    @property
    def needs_latency_model(self) -> bool:
        """Whether the Context must carry a latency model (the pipeline builds one on its Target)."""
        return self.config.target == "latency"

    def apply(self, graph: ModelGraph, ctx) -> PassResult:  # noqa: ANN001
        cfg = self.config
        out = graph.copy()
        blocks = [b for b in out.blocks if b.removable]
        n_remove = max(1, math.floor(cfg.target_blocks * len(out.blocks) + 0.5))  # half up: 0.25 of 6 -> 2
        if len(blocks) < 2 or n_remove >= len(out.blocks):
            raise ModelpressError(f"{graph.name} has {len(out.blocks)} blocks: removing {n_remove} leaves none",
                                  "lower target_blocks, or prune a model with more blocks")
        cost, goal = _goal(cfg, out, ctx)
        if cost is not None:
            n_remove = len(out.blocks) - 1  # at most: stop as soon as the goal is met
        task = _task(out, ctx)
        batches = _calibration(out, ctx, cfg.calibration_batches)
        before = out.num_parameters()
        ids = [b.path for b in out.blocks]  # original path of each current block, in order
        static = None if cfg.importance == "mi" else block_scores(out, cfg.importance, batches, task, seed=ctx.seed)
        steps: list[dict[str, Any]] = []
        for i in range(n_remove):
            if cost is not None and cost(out) <= goal:
                break
            paths = [b.path for b in out.blocks if b.removable and out.can_remove_blocks([b.path])]
            if not paths:
                break
            if static is None:
                scores = block_scores(out, "mi", batches, task, paths)
            else:
                current = {b.path: ids[j] for j, b in enumerate(out.blocks)}
                scores = {p: static[current[p]] for p in paths if current[p] in static}
            victim = min(scores, key=lambda p: (scores[p], p))
            original = ids[[b.path for b in out.blocks].index(victim)]
            record: dict[str, Any] = {"block": original, "score": scores[victim]}
            if cfg.fusion == "learned" and cfg.neighbours > 0:
                teacher = out.copy() if cfg.finetune_steps > 0 else None
                near_before = neighbours(out.blocks, victim, cfg.neighbours)
                near, params = remove_with_learnable_fusion(out, victim, cfg.neighbours, cfg.rank, ctx.seed + i)
                if teacher is not None:
                    group = tunable_group(out, near, cfg.group_rank, ctx.seed + i) if cfg.tune_group else []
                    record["finetune"] = finetune_group(out, teacher, victim, near_before, params, batches,
                                                        cfg.finetune_steps, cfg.lr, ctx.seed + i, group=group,
                                                        group_lr=cfg.group_lr, loss=cfg.loss)
                record["folded_layers"] = fold(out)
                record["into"] = near
            elif cfg.fusion == "merge" and cfg.neighbours > 0:
                record["into"] = remove_with_merge(out, victim, cfg.neighbours, cfg.merge_coefficient)
            else:
                out.remove_block(victim)
            ids.remove(original)
            steps.append(record)
            ctx.reporter.log(f"  removed {original} (score {scores[victim]:.4g})"
                             + (f", fused into {record['into']}" if record.get("into") else ""))
        if cost is not None and cost(out) > goal * (1 + 1e-9):
            raise ModelpressError(f"removing every removable block leaves {cost(out) / cost(graph):.3f} of the {cfg.target}, "
                                  f"not the {cfg.ratio:g} asked for", "ask for a larger ratio, or prune widths too")
        metrics = {"blocks_before": len(graph.blocks), "blocks_after": len(out.blocks),
                   "removed_blocks": [s["block"] for s in steps], "steps": steps,
                   "params_before": before, "params_after": out.num_parameters(),
                   "importance": cfg.importance, "fusion": cfg.fusion, "target": cfg.target}
        if cost is not None:
            metrics.update(ratio_asked=cfg.ratio, ratio_reached=cost(out) / cost(graph))
        return PassResult(graph=out, metrics=metrics)
