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

from typing import Any

from pydantic import Field

from modelpress.data.tasks import ClassificationTask
from modelpress.errors import ModelpressError
from modelpress.fuse.fusion import Ensemble, Fusion, FusionSettings, check_models, fuse
from modelpress.graph import ModelGraph
from modelpress.graph.run import call_module
from modelpress.passes import Context, MergePass, PassResult, as_graph_list, register

__all__ = ["FuseOT", "FuseOTConfig", "quality"]


class FuseOTConfig(FusionSettings):
    """The fusion settings (:class:`FusionSettings`) and: ``others``, checkpoints fused with the recipe's models
    (any ``modelpress.load`` source); recovery, ``recover_steps`` of distillation from the parents' weighted
    ensemble (0: none) at ``lr``, ``batch_size`` (the Context's recovery service); ``label_weight`` > 0 mixes in
    labels; ``recover_vanilla`` gives vanilla averaging the same budget for the report; ``evaluate`` scores
    parents, ensemble, vanilla and fused on the held-out split (torch) for the report."""

    others: list[str] = Field(default_factory=list)
    recover_steps: int = Field(default=0, ge=0)
    lr: float = Field(default=5e-4, gt=0)
    batch_size: int = Field(default=32, ge=1)
    label_weight: float = Field(default=0.0, ge=0, le=1)
    recover_vanilla: bool = True
    evaluate: bool = True


@register
class FuseOT(MergePass):
    """Optimal-transport fusion into the first model's architecture (see the module)."""

    name = "fuse.ot"
    Config = FuseOTConfig

    def apply(self, graphs: Any, ctx: Context) -> PassResult:
        cfg: FuseOTConfig = self.config
        cfg.check()
        models = load_models(as_graph_list(graphs), cfg.others, ctx)
        check_models(models)  # before any data: models that differ are told apart from data that does not fit
        batches = calibration_batches(models, ctx, cfg.samples)
        fusion = fuse(models, cfg, batches, seed=ctx.seed, reporter=ctx.reporter)
        ensemble = ensemble_graph(models, fusion, ctx)
        results = {"fused": fusion.graph}
        if fusion.vanilla is not None:
            results["vanilla"] = fusion.vanilla
        metrics: dict[str, Any] = {
            "models": labels(models), "settings": cfg.model_dump(exclude={"others"}),
            "weights": fusion.weights, "calibration_samples": _count(batches),
            "widths": {k: list(v) for k, v in fusion.widths.items()}, "fusion_seconds": round(fusion.seconds, 2)}
        report = evaluate_all(models, ensemble, results, ctx) if cfg.evaluate else {}
        if cfg.recover_steps:
            metrics["recovery"] = recover_all(results, ensemble, cfg, ctx, report)
        if report:
            metrics["quality"] = report
            _log(ctx, report)
        return PassResult(graph=results["fused"], metrics=metrics)


def load_models(models: list[ModelGraph], others: list[str], ctx: Context) -> list[ModelGraph]:
    """The recipe's models followed by the checkpoints ``others`` names."""
    if others:
        from modelpress.models import load

        for ref in others:
            with ctx.reporter.step(f"loading {ref}"):
                models.append(load(ref, seed=ctx.seed))
    return models


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
    if n < samples:
        ctx.reporter.log(f"  fusion calibrates on the {n} samples the data has (asked for {samples})")
    names = list(models[0].input_spec.names)
    for m in models:
        try:
            call_module(m.module, {k: v[:2] for k, v in out[0].items() if k in names}, names)
        except Exception as exc:  # noqa: BLE001 - any failure means the data does not fit
            raise ModelpressError(f"the data does not fit {m.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                                  "give data of the models' task (--data)") from exc
    return out


def labels(models: list[ModelGraph]) -> list[str]:
    """The models' names for the report, numbered where two share one (a model fused with itself)."""
    names = [m.name for m in models]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def _count(batches: list[dict]) -> int:
    return sum(int(next(iter(b.values())).shape[0]) for b in batches)


def ensemble_graph(models: list[ModelGraph], fusion: Fusion, ctx: Context) -> ModelGraph:
    """The parents' output ensemble, weighted as the fusion was (the teacher of recovery, a row of the report)."""
    classify = isinstance(ctx.task, ClassificationTask)
    module = Ensemble([m.module for m in models], list(models[0].input_spec.names), classify,
                      fusion.output_maps, fusion.weights or None)
    return ModelGraph(module.eval(), models[0].input_spec, {"kind": "ensemble"}, name="ensemble")


def quality(ctx: Context, graph: ModelGraph) -> dict[str, float]:
    """Held-out quality against ``ctx.reference`` (the anchor), torch only."""
    return {k: round(float(v), 6) for k, v in ctx.evaluate(graph, torch_only=True).metrics.items()}


def evaluate_all(models: list[ModelGraph], ensemble: ModelGraph, results: dict[str, ModelGraph], ctx: Context
                 ) -> dict[str, Any]:
    """One-shot quality of the parents, their ensemble and each result (empty without a task and held-out data)."""
    if ctx.task is None or ctx.evaluation is None:
        return {}
    report: dict[str, Any] = {"parents": {name: quality(ctx, m) for name, m in zip(labels(models), models, strict=True)},
                              "ensemble": quality(ctx, ensemble)}
    for key, g in results.items():
        report[key] = {"one_shot": quality(ctx, g)}
    return report


def recover_all(results: dict[str, ModelGraph], ensemble: ModelGraph, cfg: FuseOTConfig, ctx: Context,
                report: dict[str, Any]) -> dict[str, Any]:
    """Recovery of each result (vanilla too unless ``recover_vanilla`` is off) by distillation from the ensemble,
    on a copy, through the Context's service; the recovered quality goes into ``report``."""
    if ctx.task is None or ctx.data is None:
        raise ModelpressError("recovery needs the run's task and data", "give the run --data")
    infos = {}
    for key in list(results):
        if key == "vanilla" and not cfg.recover_vanilla:
            continue
        student = results[key].copy()
        infos[key] = ctx.recover(student, steps=cfg.recover_steps, lr=cfg.lr, teacher=ensemble,
                                 batch_size=cfg.batch_size, label_weight=cfg.label_weight, name=f"fuse-{key}")
        results[key] = student
        if key in report:
            report[key]["recovered"] = quality(ctx, student)
    return infos


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
