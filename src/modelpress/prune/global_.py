"""Global structural pruning (NViT): one ranking across every group of every kind, iterated to a target.

Each iteration scores every unit of every prunable group (heads, head widths, MLP units, residual
channels) and every removable block with one saliency criterion, ranks them on one scale, removes the
lowest-ranked units until this iteration's share of the target is met, optionally recovers for a few
steps, and re-scores. The target is a fraction of the original's parameters, MACs or latency (predicted
by the Context's latency model; the pass measures the real speedup at the end when a Target is set).

Ranking (``rank``):
- ``"nvit"``: ``I_u - eta * dLat_u`` (NViT's latency-aware score; ``eta = 0`` ranks by saliency alone).
  ``eta: auto`` makes the two terms equal at their medians over the candidate units of the first iteration
  (reported in the metrics, so the constant is never silent).
- ``"per_cost"``: ``I_u / cost_u``, the loss increase per unit of the target resource saved.
Floors keep at least a fraction of every group (``floors``, per kind); kept widths are rounded to
multiples of ``round_to`` (per kind; 8 by default for MLP, head width and residual width).

Options (off by default): ``rearrange`` re-chooses which units of each head, MLP and conv group go (same
counts) with the group's Fisher block of unit masks (Kwon et al., 2022); ``rank_refit`` scales each head's and
MLP unit's saliency by the share of its removal that the least-squares refit cannot undo; ``reconstruct`` refits, after each
iteration's removals and before its recovery, every layer that reads removed units to the input graph's
outputs on the calibration split (:mod:`modelpress.reconstruct`; per-layer output errors in the metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from modelpress.data.saliency import CRITERIA, group_saliency
from modelpress.errors import ModelpressError
from modelpress.graph import Group, ModelGraph
from modelpress.passes import GraphPass, PassConfig, PassResult, register
from modelpress.prune.budget import Costs, Kind, LatencyFn, Widths, round_keep, widths
from modelpress.prune.reconstruction import rearranged_plan, reconstruct_pruned
from modelpress.reconstruct import DEFAULT_DAMP
from modelpress.reconstruct.compensable import compensable_fractions
from modelpress.system import large_blocks_unmapped

_DEFAULT_FLOORS = {"head": 0.0, "head_dim": 0.25, "mlp": 0.05, "embedding": 0.5, "conv": 0.1}
_DEFAULT_ROUND = {"mlp": 8, "head_dim": 8, "embedding": 8, "conv": 8}


class GlobalConfig(PassConfig):
    saliency: Literal["magnitude", "taylor", "hessian", "obd"] = "hessian"
    target: Literal["params", "macs", "latency"] = "params"
    ratio: float = Field(0.5, gt=0.0, lt=1.0)  # keep this fraction of the original's target resource
    # head widths are opt-in: on MiniLM at half the latency (hessian, one shot) adding them kept 0.666 mean
    # fidelity against 0.721 without (the latency model sees a narrower head as fewer heads)
    kinds: list[Kind] = Field(default_factory=lambda: ["head", "mlp", "embedding", "conv", "block"])
    # with the refit in the loop (each iteration re-scores the refit model), MiniLM (heads and MLP, 0.5x latency,
    # 512 train sentences, no training) kept 0.854 / 0.763 / 0.871 mean cosine after 1 / 2 / 4 iterations, and 0.810
    # after 4 with 1024 sentences: the saliency of a refit model can pick units the next refit repairs worse (2
    # iterations: refit error 0.18 vs 0.13); floors 0.4 on heads and MLP steady it (4 iterations: 0.870, error 0.11)
    # session 13, MiniLM at 0.65x latency, no training: 2 iterations 0.839 and 4 iterations 0.917 at the same measured
    # 1.52-1.53x (benchmarks/pruning.py --parts minilm-int8); 8 iterations 0.910 against 4's 0.919 (predicted target)
    iterations: int = Field(4, ge=1)
    # per_cost needs no latency model (parameter and MAC targets); the prune-hessian recipe (latency target) ranks
    # by nvit with eta auto: on MiniLM at 0.5x latency it kept 0.727 mean cosine against per_cost's 0.707
    rank: Literal["nvit", "per_cost"] = "per_cost"
    eta: float | Literal["auto"] = 0.0
    floors: dict[Kind, float] = Field(default_factory=dict)
    round_to: dict[Kind, int] = Field(default_factory=dict)
    batches: int = Field(16, ge=1)  # calibration batches the saliency averages over
    label_weight: float = Field(0.0, ge=0.0, le=1.0)
    # distillation steps after each iteration but the last. Off by default: on MiniLM at 0.5x predicted latency
    # (4 iterations, reconstruction) 250 steps between iterations and 250 after kept 0.876 mean cosine against
    # 0.899 for the same 1000 steps after a one-shot prune (session 13, one run each)
    recover_steps: int = Field(0, ge=0)
    recover_lr: float = Field(3e-4, gt=0)  # the recover pass's default (best of 1e-4, 3e-4, 1e-3 on MiniLM)
    recover_hidden_weight: float | None = Field(None, ge=0)  # hidden-state distillation; None: recovery's default
    tolerance: float = Field(0.02, ge=0.0)  # accept the target within this fraction of the original
    measure: bool = True  # confirm a latency target with a real measurement on the Context's Target
    confirm_rounds: int = Field(2, ge=0)  # prune on while the measured latency misses the target (0: report only)
    # after each iteration's removals (before its recovery): refit the layers that read removed units to the
    # input graph's outputs on the calibration split (modelpress.reconstruct). On by default: with no training,
    # MiniLM at 0.5x latency kept 0.868 mean cosine against 0.707, the digits ViT at 75% fewer parameters 0.975
    # accuracy against 0.775 (full 0.980), the digits CNN at half its channels 0.994 agreement against 0.220
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
    # re-choose which units of each head/MLP/conv group go (same counts) with the group's Fisher block of unit
    # masks (Kwon et al. 2022's mask rearrangement), on up to rearrange_samples calibration samples; off until measured
    rearrange: bool = False
    rearrange_samples: int = Field(64, ge=1)
    # scale each head's and MLP unit's saliency by the share of its removal's output error that the least-squares
    # refit cannot undo (ZipLM's OBS error over the unrefit one, from X^T X of the reading Linear's inputs on the
    # saliency batches; modelpress.reconstruct.compensable): the ranking sees what survives the refit. Off: on
    # MiniLM (heads and MLP, 0.5x latency, one iteration, refit with 512 train sentences) it kept 0.657 mean cosine
    # against 0.854 (single-unit fractions are optimistic for the MLP units that go together: it removed 2/3 of them)
    rank_refit: bool = False

    def model_post_init(self, __context: object) -> None:
        if "channel" in self.kinds:
            raise ValueError("prune.global ranks heads, head widths, MLP units, residual and conv channels and "
                             "blocks: 'channel' groups are not among them")
        for kind, f in self.floors.items():
            if not 0.0 <= f < 1.0:
                raise ValueError(f"floors.{kind} must be in [0, 1), got {f}")
        for kind, n in self.round_to.items():
            if n < 1:
                raise ValueError(f"round_to.{kind} must be >= 1, got {n}")


@dataclass
class _Run:
    """What one application of the pass carries between its pruning rounds and measurements."""

    ctx: Any  # the Context
    original: ModelGraph  # the pass's input graph (what reconstruction refits toward)
    start: float  # the original's total of the target resource
    latency_fn: LatencyFn | None
    floors: dict[str, float]
    rounding: dict[str, int]
    original_sizes: dict[str, int]  # group name -> units in the original (floors are fractions of these)
    eta: float | None  # None until ``eta: auto`` is set by the first ranking
    history: list[dict] = field(default_factory=list)  # one entry per removal iteration
    confirmations: list[dict] = field(default_factory=list)  # one entry per latency measurement


@dataclass
class _Candidate:
    group: str  # group name, or block path for kind "block"
    unit: int
    score: float
    cost: float
    rank: float = 0.0
    inside: dict[str, float] = field(default_factory=dict)  # block path -> the part of ``cost`` inside it


@register
class GlobalPrune(GraphPass):
    """Hessian-aware global structural pruning to a parameter, MAC or latency target (NViT)."""

    name = "prune.global"
    Config = GlobalConfig

    @property
    def needs_latency_model(self) -> bool:
        """Whether the Context must carry a latency model (the pipeline builds one on its Target)."""
        cfg = self.config
        return cfg.target == "latency" or (cfg.rank == "nvit" and cfg.eta != 0)

    def apply(self, graph: ModelGraph, ctx) -> PassResult:  # noqa: ANN001
        with large_blocks_unmapped():  # freed activations and gradients leave the resident set (BERT-base: -120 MiB)
            return self._apply(graph, ctx)

    def _apply(self, graph: ModelGraph, ctx) -> PassResult:  # noqa: ANN001
        cfg = self.config
        latency_fn = _latency_fn(ctx) if self.needs_latency_model else None
        _ = graph.groups, graph.blocks  # discovered on the original (one model in memory), carried by the copy
        graph.drop_mapped_weights()  # the discovery's dry runs read every weight: off the resident set again
        # the copy shares the original's weights until an edit replaces them (removal slices new tensors, the refit
        # puts new storage in): the pass holds the original plus what it cut, not two models; owned on the way out
        out = graph.copy(share_weights=True)
        run = _Run(ctx=ctx, original=graph, start=Costs(out, cfg.target, latency_fn).total(out), latency_fn=latency_fn,
                   floors={**_DEFAULT_FLOORS, **cfg.floors}, rounding={**_DEFAULT_ROUND, **cfg.round_to},
                   original_sizes={g.name: g.size for g in out.groups},
                   eta=None if cfg.eta == "auto" else float(cfg.eta))
        goal = cfg.ratio * run.start
        measuring = cfg.target == "latency" and cfg.measure and ctx.target is not None
        if measuring and cfg.iterations > 1:
            goal = self._aim_by_measurement(graph, out, run, goal)
            final = self._prune_to(out, run, goal, 1)
        else:
            final = self._prune_to(out, run, goal, cfg.iterations)
        if final > goal + cfg.tolerance * run.start:
            raise ModelpressError(
                f"prune.global reached {final / run.start:.3f} of the original {cfg.target}, not the {cfg.ratio:g} asked for: "
                "the floors and fixed groups leave no more to remove",
                "lower the floors, allow more kinds, or ask for a larger ratio",
            )
        if measuring:
            final = self._confirm(graph, out, run, goal, final)
        out.own_weights(graph)
        return PassResult(graph=out, metrics=self._metrics(graph, out, run, final))

    def _metrics(self, graph: ModelGraph, out: ModelGraph, run: _Run, final: float) -> dict[str, Any]:
        cfg = self.config
        now = widths(out)
        metrics: dict[str, Any] = {
            "saliency": cfg.saliency,
            "target": cfg.target,
            "ratio_asked": cfg.ratio,
            "ratio_reached": final / run.start,
            "params_before": graph.num_parameters(),
            "params_after": out.num_parameters(),
            "widths": dict(now.blocks),
            "embedding": now.embedding,
            "iterations": run.history,
        }
        if run.eta is not None and cfg.rank == "nvit":
            metrics["eta"] = run.eta
        refits = [h["reconstruct"] for h in run.history if "reconstruct" in h]
        if refits:
            metrics["reconstruct"] = refits[-1]
        if cfg.target == "latency":
            metrics["predicted_speedup"] = run.start / final
            if run.confirmations:
                metrics["measured_speedup"] = run.confirmations[-1]["measured_speedup"]
                metrics["confirmations"] = run.confirmations
        return metrics

    def _aim_by_measurement(self, graph: ModelGraph, out: ModelGraph, run: _Run, goal: float) -> float:
        """Prune all iterations but the last, measure, and return the predicted latency the last iteration
        should aim at so that the measured one lands on the target: the table's error is corrected both ways
        (too slow and too fast)."""
        cfg = self.config
        before = run.start - (run.start - goal) * (cfg.iterations - 1) / cfg.iterations
        now = self._prune_to(out, run, before, cfg.iterations - 1)
        if cfg.recover_steps:
            self._recover(out, run.ctx, run.original)
        speedup = _measured_speedup(graph, out, run.ctx)
        run.confirmations.append({"stage": "before the last iteration", "predicted_speedup": run.start / now,
                                  "measured_speedup": speedup, "predicted_goal": goal / run.start})
        run.ctx.reporter.log(f"  measured {speedup:.2f}x (predicted {run.start / now:.2f}x)")
        if np.isfinite(speedup) and speedup > 0:
            error = (1.0 / speedup) / (now / run.start)  # measured / predicted latency
            goal = float(np.clip(goal / error, 0.5 * goal, min(2.0 * goal, now)))
        run.confirmations[-1]["aimed_goal"] = goal / run.start  # the predicted ratio the last iteration aims at
        return goal

    def _prune_to(self, out: ModelGraph, run: _Run, goal: float, iterations: int) -> float:
        """Score, remove and (optionally) recover in ``iterations`` equal steps from the current cost down to
        ``goal`` (the asked iterations, then up to as many again if rounding and floors left it unmet)."""
        cfg, ctx, start = self.config, run.ctx, run.start
        begin = Costs(out, cfg.target, run.latency_fn).total(out)
        for it in range(2 * iterations):
            costs = Costs(out, cfg.target, run.latency_fn)
            now = costs.total(out)
            step_goal = begin - (begin - goal) * min(1.0, (it + 1) / iterations)
            if now <= step_goal + cfg.tolerance * start * 0.5:
                if it >= iterations - 1:
                    break
                continue
            cands = self._candidates(out, ctx, costs, run.floors, run.original_sizes)
            if not cands:
                break
            self._rank(out, cands, run)
            plan, blocks = _plan_removals(out, cands, now - step_goal, run.floors, run.rounding, run.original_sizes)
            if not plan and not blocks:
                break
            rearranged = None
            if cfg.rearrange:
                plan, rearranged = rearranged_plan(out, plan, ctx, cfg.rearrange_samples)
            # the saliency (and the rearrangement) read every weight of the copy, shared with the original's
            # mapped ones: off the resident set before the removal slices new tensors beside them
            run.original.drop_mapped_weights()
            out.remove_many(list(plan.items()))
            out.remove_blocks(list(blocks))
            after = Costs(out, cfg.target, run.latency_fn).total(out)
            run.history.append({"iteration": len(run.history),
                                "removed_units": {k: len(v) for k, v in plan.items()},
                                "removed_blocks": blocks, cfg.target: after})
            if rearranged:
                run.history[-1]["rearrange"] = rearranged
            if cfg.reconstruct:
                # the refit reads the original block by block (and drops each block it has passed): its weights
                # mapped from the checkpoint, read by the saliency, need not all stay resident meanwhile
                run.original.drop_mapped_weights()
                run.history[-1]["reconstruct"] = reconstruct_pruned(
                    run.original, out, ctx, cfg.reconstruct_damp, cfg.reconstruct_mode, cfg.reconstruct_target,
                    cfg.reconstruct_samples, cfg.reconstruct_scope)
            ctx.reporter.log(
                f"  iteration {len(run.history)}: {cfg.target} {after / start:.3f} of the original"
                f" ({sum(len(v) for v in plan.values())} units, {len(blocks)} blocks removed)"
            )
            if cfg.recover_steps and it < iterations - 1:
                self._recover(out, ctx, run.original)
        return Costs(out, cfg.target, run.latency_fn).total(out)

    def _rank(self, out: ModelGraph, cands: list[_Candidate], run: _Run) -> None:
        """Set every candidate's rank (lowest goes first): NViT's ``I - eta * dLat``, or saliency per cost."""
        cfg = self.config
        if cfg.rank == "nvit" and run.latency_fn is not None:
            if run.eta is None:
                run.eta = _auto_eta(out, cands, run.latency_fn)
            lat = _latency_costs(out, cands, run.latency_fn) if cfg.target != "latency" else None
            for c in cands:
                c.rank = c.score - run.eta * (c.cost if lat is None else lat[(c.group, c.unit)])
        elif cfg.rank == "nvit":
            for c in cands:
                c.rank = c.score
        else:
            for c in cands:
                c.rank = c.score / max(c.cost, 1e-12)

    def _confirm(self, original: ModelGraph, out: ModelGraph, run: _Run, goal: float, final: float) -> float:
        """Measure the pruned model against the original on the Target; while the measured latency misses
        the asked ratio (by more than ``tolerance``), rescale the predicted goal by measured / predicted and
        prune on toward it, up to ``confirm_rounds`` times. The latency model sets where pruning goes; the
        measurement decides when it stops."""
        cfg, start = self.config, run.start
        for round_ in range(cfg.confirm_rounds + 1):
            speedup = _measured_speedup(original, out, run.ctx)
            measured, predicted = 1.0 / speedup, final / start
            run.confirmations.append({"predicted_speedup": start / final, "measured_speedup": speedup,
                                      "predicted_goal": goal / start})
            run.ctx.reporter.log(f"  measured {speedup:.2f}x (predicted {start / final:.2f}x)")
            if not np.isfinite(speedup) or measured <= cfg.ratio + cfg.tolerance or round_ == cfg.confirm_rounds:
                break
            goal = goal * cfg.ratio / measured  # the predicted latency at which the measured one should land
            if goal >= final:  # the measurement says the model is already fast enough per the model's error
                break
            final = self._prune_to(out, run, goal, max(1, cfg.iterations // 2))
            if predicted - final / start < 1e-6:
                break  # nothing more could be removed
        return final

    def _recover(self, graph: ModelGraph, ctx, original: ModelGraph) -> None:  # noqa: ANN001
        """Distil from the reference for ``recover_steps`` between iterations (the Context's recovery service)."""
        cfg = self.config
        graph.own_weights(original)  # training writes in place: nothing may still be the original's
        ctx.recover(graph, steps=cfg.recover_steps, lr=cfg.recover_lr, label_weight=cfg.label_weight,
                    hidden_weight=cfg.recover_hidden_weight)

    def _candidates(
        self, graph: ModelGraph, ctx, costs: Costs, floors: dict, original: dict  # noqa: ANN001
    ) -> list[_Candidate]:
        cfg = self.config
        scored = [g for g in graph.groups if g.prunable and g.kind in cfg.kinds and not g.meta.get("fixed")]
        groups = [g for g in scored if g.size > _floor(g, floors, original)]  # at their floor: blocks only
        block_sets = {}
        if "block" in cfg.kinds and len(graph.blocks) > 1:
            block_sets = {
                f"block:{b.path}": [f"{b.path}.{n}" for n, _ in graph.module.get_submodule(b.path).named_parameters()]
                for b in graph.blocks
                if b.removable
            }
        data = ctx.calibration if ctx is not None else None
        if data is not None and len(data.batches) > cfg.batches:
            data = type(data)(list(data.batches)[: cfg.batches],
                              None if data.labels is None else list(data.labels)[: cfg.batches])
        scores = group_saliency(
            graph, cfg.saliency, groups=scored, data=data, task=ctx.task,
            reference=None if ctx.reference is None else ctx.reference.module,
            label_weight=cfg.label_weight, param_sets=block_sets, seed=ctx.seed, reporter=ctx.reporter,
        )
        if cfg.rank_refit and data is not None:
            fractions = compensable_fractions(graph.module, [g for g in groups if g.kind in ("head", "mlp")],
                                              data.batches, cfg.reconstruct_damp, graph.input_spec.names)
            for name, f in fractions.items():
                scores[name] = np.asarray(scores[name], dtype=np.float64) * f
        current = widths(graph)
        paths = [k.removeprefix("block:") for k in block_sets]
        cands: list[_Candidate] = []
        for g in groups:
            unit_cost = costs.units(graph, g, current)
            spans = [p for p in paths if not _inside(g.scope, p)] if paths else []
            inside = costs.units_inside(graph, g, spans, unit_cost) if spans else {}
            for u in range(g.size):
                cands.append(_Candidate(g.name, u, float(scores[g.name][u]), float(unit_cost[u]),
                                        inside={p: float(v[u]) for p, v in inside.items()}))
        for key in block_sets:
            path = key.removeprefix("block:")
            cands.append(_Candidate(key, 0, _block_score(graph, path, scores, key), costs.block(graph, path, current)))
        return cands


def _block_score(graph: ModelGraph, path: str, scores: dict, key: str) -> float:
    """A block's saliency: the sum of the saliencies of the units whose removal empties it (its heads,
    MLP units, conv channels), the diagonal approximation of removing them together. ``(sum w g)^2`` over
    the whole block's parameters would let thousands of terms cancel and rank deep blocks as free; it is
    used only for blocks without scored groups."""
    inside = [g for g in graph.groups if g.name in scores and g.kind != "embedding" and _inside(g.scope, path)]
    if inside:
        return float(sum(scores[g.name].sum() for g in inside if g.kind != "head_dim"))
    return float(scores[key][0])


def block_saliency(graph: ModelGraph, paths: list[str], batches: list[dict], task: Any, *,
                   criterion: str = "hessian", reference: Any = None, seed: int = 0) -> dict[str, float]:
    """The saliency this pass gives each block in ``paths`` (its ``_block_score``: the summed saliencies of the
    heads, MLP units and conv channels inside it, or, without any, the whole block scored as one set), on
    ``batches``; for ranking blocks alone (``prune.fuse_blocks``' ``hessian`` importance)."""
    from modelpress.data import DataSplit

    scored = [g for g in graph.groups if g.prunable and g.kind in ("head", "mlp", "conv") and not g.meta.get("fixed")]
    scored = [g for g in scored if any(_inside(g.scope, p) for p in paths)]
    sets = {f"block:{p}": [f"{p}.{n}" for n, _ in graph.module.get_submodule(p).named_parameters()] for p in paths}
    scores = group_saliency(graph, criterion, groups=scored, data=DataSplit(list(batches)), task=task,
                            reference=reference, param_sets=sets, seed=seed)
    return {p: _block_score(graph, p, scores, f"block:{p}") for p in paths}


def _floor(group: Group, floors: dict, original: dict) -> int:
    size = original.get(group.name, group.size)
    return max(1, int(np.ceil(floors.get(group.kind, 0.0) * size)))


def _plan_removals(
    graph: ModelGraph, cands: list[_Candidate], need: float, floors: dict, rounding: dict, original: dict
) -> tuple[dict[str, list[int]], list[str]]:
    """Lowest-ranked units until ``need`` is saved (floors kept), then kept widths rounded per group."""
    by_name = {g.name: g for g in graph.groups}
    take: dict[str, list[int]] = {}
    blocks: list[str] = []
    saved = 0.0
    by_unit = {(c.group, c.unit): c for c in cands}
    for c in sorted(cands, key=lambda c: (c.rank, c.group, c.unit)):
        if saved >= need:
            break
        if c.group.startswith("block:"):
            path = c.group.removeprefix("block:")
            if len(blocks) + 1 < len(graph.blocks) and graph.can_remove_blocks([*blocks, path]):
                blocks.append(path)
                inside = [n for n in take if _inside(by_name[n].scope, path)]
                # what is already counted: the units inside the block, and the slices inside it of units that
                # span it (residual channels: their norm and projection slices go with the block)
                counted = sum(by_unit[(n, u)].cost for n in inside for u in take[n])
                counted += sum(by_unit[(n, u)].inside.get(path, 0.0) for n in take if n not in inside for u in take[n])
                saved += c.cost - counted
                for n in inside:
                    del take[n]
            continue
        g = by_name[c.group]
        if any(_inside(g.scope, b) for b in blocks):
            continue  # its block goes as a whole
        chosen = take.setdefault(c.group, [])
        if g.size - len(chosen) - 1 < _floor(g, floors, original):
            continue
        chosen.append(c.unit)
        saved += c.cost - sum(c.inside.get(b, 0.0) for b in blocks)  # a removed block's slices are saved already
    ranked = {}
    for c in cands:
        ranked.setdefault(c.group, []).append(c)
    plan: dict[str, list[int]] = {}
    for name, chosen in take.items():
        g = by_name[name]
        if any(_inside(g.scope, b) for b in blocks):
            continue  # the whole block goes
        keep = round_keep(g.size - len(chosen), g.size, rounding.get(g.kind, 1), _floor(g, floors, original))
        order = [c.unit for c in sorted(ranked[name], key=lambda c: (c.rank, c.unit))]
        drop = sorted(order[: g.size - keep])
        if drop:
            plan[name] = drop
    return plan, blocks


def _inside(scope: str, path: str) -> bool:
    return scope == path or scope.startswith(path + ".")


def _latency_fn(ctx) -> LatencyFn:  # noqa: ANN001
    model = getattr(ctx, "latency_model", None)
    if model is None:
        raise ModelpressError(
            "a latency target (or eta) needs a latency model on the Context",
            "build one with `modelpress bench --latency-table CKPT` (the compress command loads it for you)",
        )
    if ctx.reference is not None and hasattr(model, "check"):
        model.check(ctx.reference)  # measured for this architecture (a short error otherwise)

    def predict(w: Widths) -> float:
        return float(model.predict_widths(list(w.blocks.values()), w.embedding, w.convs))

    return predict


def _latency_costs(graph: ModelGraph, cands: list[_Candidate], latency_fn) -> dict:  # noqa: ANN001
    current = widths(graph)
    base = latency_fn(current)
    by_name = {g.name: g for g in graph.groups}
    out = {}
    for c in cands:
        if c.group.startswith("block:"):
            out[(c.group, c.unit)] = base - latency_fn(current.without_block(c.group.removeprefix("block:")))
        else:
            out[(c.group, c.unit)] = base - latency_fn(current.without(by_name[c.group]))
    return out


def _auto_eta(graph: ModelGraph, cands: list[_Candidate], latency_fn) -> float:  # noqa: ANN001
    lat = _latency_costs(graph, cands, latency_fn)
    scores = np.median([c.score for c in cands])
    saving = np.median([max(v, 1e-12) for v in lat.values()])
    return float(scores / saving)


def _measured_speedup(original: ModelGraph, pruned: ModelGraph, ctx) -> float:  # noqa: ANN001
    """The pruned model's speedup over the original, measured interleaved at the latency model's shape."""
    key = getattr(ctx.latency_model, "key", {}) or {}
    batch = int(key.get("batch", 1))
    seq = key.get("seq")
    timing = {"batch_sizes": [batch], "memory": False, "rounds": 5}
    if seq is not None and original.input_spec.kind == "text":
        timing["seq_lens"] = [int(seq)]
    report = ctx.measure({"original": original, "pruned": pruned}, baseline="original", **timing)
    value = report.speedup("pruned", batch, seq if "seq_lens" in timing else None)
    return float(value) if value is not None else float("nan")


__all__ = ["CRITERIA", "GlobalConfig", "GlobalPrune"]
