"""The ``fuse.ot`` merge pass: optimal-transport fusion of the recipe's models (and the checkpoints its
config names), then the same label-free recovery for the fused model and vanilla averaging: distillation
from the parents' output ensemble through the shared training loop (:mod:`modelpress.train`).

A recipe::

    passes:
      - pass: fuse.ot
        others: [path/to/second, path/to/third]
        alignment: hard          # hard (ot.emd) | soft (ot.sinkhorn, reg)
        cost: acts               # acts (probes on the calibration split) | weights
        qk: per-head             # separate | shared | per-head
        width: {mlp: 0.5}        # a narrower target: fusion as compression
        recover_steps: 200
      - pass: quantize.repq
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from modelpress.data.tasks import ClassificationTask
from modelpress.errors import ModelpressError
from modelpress.fuse.fusion import Ensemble, Fusion, FusionSettings, fuse
from modelpress.graph import ModelGraph
from modelpress.passes import Context, MergePass, PassConfig, PassResult, register

__all__ = ["FuseOT", "FuseOTConfig", "recover", "quality"]


class FuseOTConfig(PassConfig):
    """``others``: checkpoints fused with the recipe's models (any ``modelpress.load`` source); ``weights``: one
    per model (default equal); alignment, cost, QK mode, residual policy, Sinkhorn ``reg``; activation costs on
    ``samples`` calibration samples (``tokens`` all | first, at most ``max_rows`` positions); ``width``: a
    narrower target per group kind (fraction of the anchor or a unit count). Recovery: ``recover_steps`` of
    distillation from the parents' ensemble (0: none) at ``lr``, ``batch_size``; ``label_weight`` > 0 mixes in
    labels; ``recover_vanilla`` gives vanilla averaging the same budget for the report; ``evaluate`` scores
    parents, ensemble, vanilla and fused on the held-out split (torch) for the report."""

    others: list[str] = Field(default_factory=list)
    weights: list[float] | None = None
    alignment: Literal["hard", "soft"] = "hard"
    cost: Literal["acts", "weights"] = "acts"
    qk: Literal["separate", "shared", "per-head"] = "per-head"
    residual: Literal["mean", "weighted", "residual"] = "mean"
    reg: float = Field(default=0.01, gt=0)
    samples: int = Field(default=200, ge=2)
    tokens: Literal["all", "first"] = "all"
    max_rows: int = Field(default=4096, ge=2)
    width: dict[str, float] = Field(default_factory=dict)
    recover_steps: int = Field(default=0, ge=0)
    lr: float = Field(default=5e-4, gt=0)
    batch_size: int = Field(default=32, ge=1)
    label_weight: float = Field(default=0.0, ge=0, le=1)
    recover_vanilla: bool = True
    evaluate: bool = True

    def settings(self) -> FusionSettings:
        return FusionSettings(self.alignment, self.cost, self.qk, self.residual, self.reg, self.samples, self.tokens,
                              self.max_rows, tuple(sorted(self.width.items())),
                              None if self.weights is None else tuple(self.weights))


@register
class FuseOT(MergePass):
    """Optimal-transport fusion into the first model's architecture (see the module)."""

    name = "fuse.ot"
    Config = FuseOTConfig

    def apply(self, graphs: Any, ctx: Context) -> PassResult:
        cfg: FuseOTConfig = self.config
        from modelpress.passes import as_graph_list

        models = as_graph_list(graphs)
        if cfg.others:
            from modelpress.models import load

            for ref in cfg.others:
                with ctx.reporter.step(f"loading {ref}"):
                    models.append(load(ref))
        settings = cfg.settings()
        settings.check()
        batches = calibration_batches(models, ctx, cfg.samples)
        fusion = fuse(models, settings, batches, seed=ctx.seed, reporter=ctx.reporter)
        metrics: dict[str, Any] = {"models": [m.name for m in models], "settings": cfg.model_dump(exclude={"others"}),
                                   "widths": {k: list(v) for k, v in fusion.widths.items()},
                                   "fusion_seconds": round(fusion.seconds, 2)}
        ensemble = ensemble_graph(models, fusion, ctx)
        results = {"fused": fusion.graph}
        if fusion.vanilla is not None:
            results["vanilla"] = fusion.vanilla
        report: dict[str, Any] = {}
        if cfg.evaluate and ctx.task is not None and ctx.evaluation is not None:
            report["parents"] = {m.name: quality(ctx, m) for m in models}
            report["ensemble"] = quality(ctx, ensemble)
            for key, g in results.items():
                report[key] = {"one_shot": quality(ctx, g)}
        if cfg.recover_steps:
            for key in list(results):
                if key == "vanilla" and not cfg.recover_vanilla:
                    continue
                results[key], info = recover(results[key], ensemble, ctx, cfg.recover_steps, cfg.lr, cfg.batch_size,
                                             cfg.label_weight)
                metrics.setdefault("recovery", {})[key] = info
                if key in report:
                    report[key]["recovered"] = quality(ctx, results[key])
        if report:
            metrics["quality"] = report
            _log(ctx, report)
        return PassResult(graph=results["fused"], metrics=metrics)


def calibration_batches(models: list[ModelGraph], ctx: Context, samples: int) -> list[dict]:
    """The first ``samples`` calibration samples as batches; every model must run on them (else a short error)."""
    split = ctx.calibration
    if split is None or not len(split):
        if ctx.data is None:
            return []
        raise ModelpressError("fusion needs calibration data, and the run's data has none", "give the run --data")
    out, n = [], 0
    for batch in split.batches:
        size = int(next(iter(batch.values())).shape[0])
        take = min(size, samples - n)
        out.append({k: v[:take] for k, v in batch.items()})
        n += take
        if n >= samples:
            break
    from modelpress.graph.run import call_module

    names = list(models[0].input_spec.names)
    for m in models:
        try:
            call_module(m.module, {k: v[:2] for k, v in out[0].items() if k in names}, names)
        except Exception as exc:  # noqa: BLE001 - any failure means the data does not fit
            raise ModelpressError(f"the data does not fit {m.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                                  "give data of the models' task (--data)") from exc
    return out


def ensemble_graph(models: list[ModelGraph], fusion: Fusion, ctx: Context) -> ModelGraph:
    """The parents' output ensemble as a ModelGraph (the teacher of recovery, a row of the report)."""
    classify = isinstance(ctx.task, ClassificationTask)
    module = Ensemble([m.module for m in models], list(models[0].input_spec.names), classify,
                      fusion.output_maps)
    return ModelGraph(module.eval(), models[0].input_spec, {"kind": "ensemble"}, name="ensemble")


def quality(ctx: Context, graph: ModelGraph) -> dict[str, float]:
    """Held-out quality against ``ctx.reference`` (the anchor), torch only."""
    return {k: round(float(v), 6) for k, v in ctx.evaluate(graph, torch_only=True).metrics.items()}


def recover(graph: ModelGraph, teacher: ModelGraph, ctx: Context, steps: int, lr: float, batch_size: int,
            label_weight: float = 0.0) -> tuple[ModelGraph, dict[str, Any]]:
    """Distil ``teacher`` (the parents' ensemble) into a copy of ``graph`` for ``steps`` (label-free unless
    ``label_weight`` > 0) on the train split (the calibration split when there is none)."""
    from modelpress.train import TrainConfig, train

    if ctx.task is None or ctx.data is None:
        raise ModelpressError("recovery needs the run's task and data", "give the run --data")
    try:
        split = ctx.data.train
    except ModelpressError:
        split = ctx.calibration
    student = graph.copy()
    config = TrainConfig(steps=steps, lr=lr, weight_decay=0.01, schedule="cosine", warmup_steps=min(100, steps // 10),
                         grad_clip=1.0, batch_size=batch_size, seed=ctx.seed, label_weight=label_weight, dropout=False,
                         checkpoint_dir=Path(ctx.workdir) / "checkpoints" / f"fuse-{graph.name}-{time.time_ns()}")
    result = train(student.module, split, task=ctx.task, teacher=teacher.module, config=config,
                   input_names=list(graph.input_spec.names), reporter=ctx.reporter)
    losses = [v for _, v in result.losses]
    return student, {"steps": result.steps, "seconds": round(result.seconds, 2),
                     "loss_start": losses[0] if losses else None, "loss_end": losses[-1] if losses else None}


def _log(ctx: Context, report: dict[str, Any]) -> None:
    key = "accuracy" if "accuracy" in report.get("ensemble", {}) else next(iter(report.get("ensemble", {})), None)
    if key is None:
        return
    nan = float("nan")
    parents = ", ".join(f"{q.get(key, nan):.3f}" for q in report["parents"].values())
    parts = [f"parents {parents}", f"ensemble {report['ensemble'].get(key, nan):.3f}"]
    for name in ("vanilla", "fused"):
        if name in report:
            r = report[name]
            after = f" -> {r['recovered'].get(key, nan):.3f}" if "recovered" in r else ""
            parts.append(f"{name} {r['one_shot'].get(key, nan):.3f}{after}")
    ctx.reporter.log(f"  {key}: " + "; ".join(parts))
