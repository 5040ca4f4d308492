"""The split itself: restrict, prune and recover one sub-model per class subset, fit both combiners,
measure and place."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpress.data.sources import DataSplit, TaskData
from modelpress.errors import ModelpressError
from modelpress.graph import Group, ModelGraph
from modelpress.passes import Context
from modelpress.progress import QUIET, Reporter
from modelpress.prune.classwise.combiners import ConcatCombiner, fit_concat, fit_fusion
from modelpress.prune.classwise.config import PRUNE_DEFAULTS, ClasswiseConfig
from modelpress.prune.classwise.data import logits, sample_classes, subset_split, train_split_of
from modelpress.prune.classwise.measure import device_memory, measure_latencies, weight_bytes
from modelpress.prune.classwise.result import ClasswiseResult, SubModel
from modelpress.prune.classwise.subsets import balanced_subsets, check_subsets, classifier_group, restricted
from modelpress.prune.global_ import GlobalConfig, GlobalPrune
from modelpress.prune.placement import Device, assign
from modelpress.targets import Target


def classwise_split(
    graph: ModelGraph,
    data: TaskData,
    task: Any,
    config: ClasswiseConfig | None = None,
    *,
    devices: Sequence[Device | dict[str, Any]] | None = None,
    target: Target | str | None = None,
    seed: int = 0,
    reporter: Reporter = QUIET,
    latency_model: Any = None,
    **settings: Any,
) -> ClasswiseResult:
    """Split the classifier ``graph`` into class-subset sub-models, prune and recover each, fit both
    combiners and place the sub-models on ``devices``; see the package docstring.

    ``config`` or ``settings`` (the fields of :class:`ClasswiseConfig`: k or subsets, ratio, saliency,
    recover_steps, ...). ``data``: calibration (saliency, combiners), evaluation (every accuracy in the
    report) and train (recovery; the calibration split when there is none). ``devices``: Devices (or their
    recipe mappings); default: one device per sub-model on ``target`` (ort-cpu), memory unlimited.
    ``latency_model``: for prune settings with a latency target. Everything is checked before the work starts.
    """
    cfg = _config(config, settings)
    group, num_classes = classifier_group(graph, task)
    subsets = check_subsets(cfg.subsets, num_classes) if cfg.subsets is not None else balanced_subsets(
        num_classes, int(cfg.k))
    device_list = _devices(cfg, devices, target, len(subsets))
    if data is None or data.calibration is None or data.evaluation is None:
        raise ModelpressError("class-wise pruning needs data (calibration and evaluation)", "give the run --data")
    train_split = train_split_of(data)
    fusion_split = train_split if cfg.fusion_data == "train" else data.calibration
    classes_of = _classes_of(graph, data, train_split, cfg.fusion_data, subsets)
    names = list(graph.input_spec.names)
    full_acc = float((logits(graph.module, names, data.evaluation).argmax(1) == classes_of["evaluation"]).mean())
    reporter.log(f"class-wise split of {graph.name} ({num_classes} classes) into {len(subsets)} sub-models: "
                 f"{subsets}")
    job = _Job(graph, group, task, cfg, data, train_split, classes_of, data.evaluation.labels is not None, seed,
               reporter, latency_model)
    with tempfile.TemporaryDirectory(prefix="modelpress-classwise-") as scratch:
        subs = [job.sub_model(f"sub{i}", subset, Path(scratch)) for i, subset in enumerate(subsets)]
        latency = measure_latencies(graph, subs, device_list, Path(scratch), reporter)

    fit_parts = [torch.from_numpy(logits(s.graph.module, names, fusion_split)) for s in subs]
    fit_target = torch.as_tensor(classes_of["fusion"], dtype=torch.long)
    concat = fit_concat(fit_parts, subsets, fit_target)
    fusion = fit_fusion(fit_parts, fit_target, num_classes, cfg.fusion_hidden, cfg.fusion_steps, cfg.fusion_lr,
                        seed)
    eval_parts = [torch.from_numpy(logits(s.graph.module, names, data.evaluation)) for s in subs]
    uncalibrated = ConcatCombiner(subsets, [1.0] * len(subs), [0.0] * len(subs))
    with torch.no_grad():
        acc = {rule: float((comb(*eval_parts).argmax(1).numpy() == classes_of["evaluation"]).mean())
               for rule, comb in (("concat", concat), ("fusion", fusion), ("uncalibrated", uncalibrated))}
    placement = assign(latency.sub_models, [s.info["memory_bytes"] for s in subs], device_list,
                       [s.name for s in subs])
    for i, s in enumerate(subs):
        s.info["latency_ms"] = {d.name: latency.sub_models[i][j] for j, d in enumerate(device_list)}
        s.info["device"] = placement.device[i]
    result = ClasswiseResult(subs, num_classes, concat, fusion, placement, {},
                             check_batch=data.evaluation.batches[0])
    metric = "accuracy" if job.labelled else "agreement"
    result.report = {
        "method": "prune.classwise (ED-ViT class-wise split)",
        "settings": cfg.model_dump(mode="json"),
        "seed": seed,
        "subsets": subsets,
        "full": {"params": graph.num_parameters(), metric: full_acc,
                 "latency_ms": {d.name: latency.full[j] for j, d in enumerate(device_list)}},
        "sub_models": [{"name": s.name, **s.info} for s in subs],
        "total_params": sum(s.info["params"] for s in subs),
        "largest_sub_model_reduction": graph.num_parameters() / max(s.info["params"] for s in subs),
        "combined": {
            "metric": metric,
            "samples": len(data.evaluation),
            "concat": {metric: acc["concat"], "uncalibrated": acc["uncalibrated"],
                       "temperatures": (1.0 / result.per_model(concat.scale)).tolist(),
                       "offsets": result.per_model(concat.shift).tolist()},
            "fusion": {metric: acc["fusion"], "hidden": cfg.fusion_hidden, "steps": cfg.fusion_steps},
            "full_model": full_acc,
            "fitted_on": f"{cfg.fusion_data} ({len(fusion_split)} samples)",
        },
        "assignment": placement.to_dict([s.name for s in subs]),
    }
    reporter.log(f"combined {metric}: concat {acc['concat']:.3f} (uncalibrated {acc['uncalibrated']:.3f}), "
                 f"fusion {acc['fusion']:.3f}; full model {full_acc:.3f}")
    return result


def _config(config: ClasswiseConfig | None, settings: dict[str, Any]) -> ClasswiseConfig:
    """``config`` with ``settings`` over it (or ``settings`` alone), validated: a short error when invalid."""
    if config is not None and not settings:
        return config
    try:
        return ClasswiseConfig(**{**(config.model_dump() if config is not None else {}), **settings})
    except ValueError as exc:
        raise ModelpressError(f"invalid class-wise settings: {exc}", "see ClasswiseConfig") from exc


def _devices(cfg: ClasswiseConfig, devices: Sequence[Device | dict[str, Any]] | None, target: Target | str | None,
             n: int) -> list[Device]:
    """The devices to place ``n`` sub-models on: given, or one per sub-model on ``target`` (ort-cpu)."""
    out = [Device.parse(d) for d in (devices if devices is not None else cfg.devices)]
    if not out:
        tgt = target or "ort-cpu"
        tgt_name = tgt if isinstance(tgt, str) else tgt.name
        out = [Device(f"{tgt_name}-{i}", None, tgt) for i in range(n)]
    for d in out:
        if d.latency_ms is not None and len(d.latency_ms) != n:
            raise ModelpressError(f"device {d.name!r} gives {len(d.latency_ms)} latencies for {n} "
                                  "sub-models", "give one latency per sub-model, in the subsets' order")
    return [device_memory(d) for d in out]


def _classes_of(graph: ModelGraph, data: TaskData, train_split: DataSplit, fusion_data: str,
                subsets: list[list[int]]) -> dict[str, np.ndarray]:
    """Each split's per-sample classes (labels, or the model's predictions); a short error when the
    calibration or train data has no sample of some subset."""
    out = {"calibration": sample_classes(data.calibration, graph),
           "evaluation": sample_classes(data.evaluation, graph),
           "train": sample_classes(train_split, graph)}
    out["fusion"] = out["train"] if fusion_data == "train" else out["calibration"]
    for split_name in ("calibration", "train"):
        present = set(out[split_name].tolist())
        empty = [i for i, s in enumerate(subsets) if not present & set(s)]
        if empty:
            raise ModelpressError(
                f"the {split_name} data has no samples of subset(s) {empty} (classes {[subsets[i] for i in empty]})",
                "give more calibration/train data, or other subsets",
            )
    return out


@dataclass
class _Job:
    """What every sub-model of one split shares."""

    graph: ModelGraph
    group: Group
    task: Any
    cfg: ClasswiseConfig
    data: TaskData
    train_split: DataSplit
    classes_of: dict[str, np.ndarray]
    labelled: bool
    seed: int
    reporter: Reporter
    latency_model: Any

    def sub_model(self, name: str, subset: list[int], scratch: Path) -> SubModel:
        """Restrict to ``subset``, prune with prune.global on the subset's data, recover, and score."""
        cfg, rep, bs = self.cfg, self.reporter, self.cfg.batch_size
        sub_data = TaskData(
            calibration=subset_split(self.data.calibration, self.classes_of["calibration"], subset, bs),
            evaluation=subset_split(self.data.evaluation, self.classes_of["evaluation"], subset, bs),
            description=f"{getattr(self.data, 'description', 'data')}, classes {subset}",
            make_train=lambda: subset_split(self.train_split, self.classes_of["train"], subset, bs),
        )
        reference = restricted(self.graph, self.group, subset)
        info: dict[str, Any] = {"classes": subset, "samples": {
            "calibration": len(sub_data.calibration), "evaluation": len(sub_data.evaluation),
            "train": len(sub_data.train)}}
        ratio = cfg.ratio * self.graph.num_parameters() / reference.num_parameters()  # of the restricted copy
        sub = reference.copy()
        if ratio < 1.0:
            ctx = Context(workdir=scratch / name, task=self.task, data=sub_data, reference=reference,
                          seed=self.seed, reporter=rep, latency_model=self.latency_model)
            with rep.step(f"{name}: classes {subset}, pruning to {cfg.ratio:g} of the parameters"):
                gcfg = GlobalConfig(**{**PRUNE_DEFAULTS, **cfg.prune, "ratio": ratio, "saliency": cfg.saliency,
                                       "label_weight": cfg.label_weight, "reconstruct": cfg.reconstruct})
                pruned = GlobalPrune(gcfg).apply(reference, ctx)
                sub = pruned.graph
                info["prune"] = {k: pruned.metrics[k] for k in ("ratio_reached", "widths", "embedding", "reconstruct")
                                 if k in pruned.metrics}
            if cfg.recover_steps:
                recover = sub_data.train if cfg.recover_data == "subset" else DataSplit(self.train_split.batches)
                with rep.step(f"{name}: recovering {cfg.recover_steps} steps on {len(recover)} samples"):
                    info["recovery"] = ctx.recover(sub, steps=cfg.recover_steps, lr=cfg.recover_lr, teacher=reference,
                                                   data=recover, label_weight=cfg.label_weight, batch_size=bs)
        sub.name = f"{self.graph.name}-{name}"
        info.update(self._scores(sub, reference, sub_data.evaluation))
        return SubModel(name, sub, subset, info)

    def _scores(self, sub: ModelGraph, reference: ModelGraph, evaluation: DataSplit) -> dict[str, Any]:
        """The sub-model's size and its accuracy (or agreement) on its subset, pruned and unpruned."""
        names = list(self.graph.input_spec.names)
        full_params, params = self.graph.num_parameters(), sub.num_parameters()
        labels = evaluation.all_labels()
        key = "subset_accuracy" if self.labelled else "subset_agreement"
        out = {
            "params": params,
            "params_fraction": params / full_params,
            "params_reduction": full_params / params,
            "memory_bytes": weight_bytes(sub.module),
            key: float((logits(sub.module, names, evaluation).argmax(1) == labels).mean()),
            f"{key}_unpruned": float((logits(reference.module, names, evaluation).argmax(1) == labels).mean()),
        }
        self.reporter.log(f"  {sub.name}: {params:,} parameters ({full_params / params:.1f}x smaller), "
                          f"{key} {out[key]:.3f} (unpruned {out[key + '_unpruned']:.3f})")
        return out
