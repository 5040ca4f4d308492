"""Class-wise pruning (ED-ViT, Liu et al., 2024): split a classifier into K sub-models, one per subset of the
classes, prune each on its subset's data, fuse their outputs, and place them on devices.

Steps, for a classifier over C classes:

1. **Split the classes** into K subsets, given (``subsets``), or balanced automatically (``k``): contiguous
   runs of the class indices whose sizes differ by at most one. Every class belongs to exactly one subset.
2. **Restrict and prune** (per subset S): a copy of the model keeps only the classifier's rows for S, so it
   outputs ``logits[:, S]`` of the original exactly; ``prune.global`` (called as a pass, with a Context whose
   data holds only S's samples and whose reference is the restricted copy) prunes it to ``ratio`` of the
   *full* model's parameters with saliency measured on S's data alone; then it is recovered on S's train
   samples by distilling from the restricted copy (KL on the S logits, label-free by default; with
   ``label_weight > 0`` the labels, remapped to S's indices, are mixed in). ``recover_data: all`` distils
   the S logits on every train sample instead (the saliency stays S's): the sub-model then also learns what
   the original says about S on the other classes' images, which keeps the K outputs comparable. A sample belongs to the subset
   of its label, or, when the data has no labels, of the original model's prediction.
3. **Combine** the K sub-models' logits into one prediction over all C classes. Two rules, both fitted on
   the calibration split (or ``fusion_data: train``) and both measured:

   - ``concat`` (calibrated concatenation): sub-model k's logits become ``z_k / T_k + b_k`` (a temperature
     and an offset per sub-model, ``b_0 = 0``, fitted jointly by minimizing the negative log-likelihood of
     the softmax over all C classes, with a small Gaussian prior on ``log T_k`` and ``b_k``), concatenated
     and put back in the original class order; argmax. The report gives the uncalibrated concatenation too.
   - ``fusion`` (ED-ViT's fusion head): the K logit vectors, concatenated and standardized, go through a
     small MLP (``fusion_hidden`` units; 0: linear) to C logits, trained by cross-entropy (Adam, full batch,
     seeded).

4. **Place** the sub-models on ``devices`` (see :mod:`modelpress.prune.placement`): latencies measured on
   each device's Target with modelpress.bench (batch 1), or given; memory = the sub-model's weight bytes.

:func:`classwise_split` returns a :class:`ClasswiseResult` (sub-model graphs, class lists, both combiners,
the assignment and a report); :meth:`ClasswiseResult.save` writes one ONNX file per sub-model (and its
reloadable weights), both combiners as ONNX (``fusion.onnx``, ``concat.onnx``) plus ``combine.json`` and
``fusion.safetensors``, the assignment (JSON and text) and ``report.json``, atomically.
:func:`onnx_predict` runs a saved split in ONNX Runtime.

As a recipe pass (``prune.classwise``): one graph goes in and K come out, so the pass returns its input graph
unchanged (what the pipeline exports, evaluates and measures is the original model, for comparison) and writes
the split into ``classwise/`` of the run's output folder; its summary is in the pass's metrics. Put it last
among the graph passes: later passes would change the original, not the sub-models.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from modelpress.data.sources import DataSplit, TaskData
from modelpress.errors import ModelpressError
from modelpress.graph import Group, ModelGraph
from modelpress.passes import Context, GraphPass, PassConfig, PassResult, register
from modelpress.progress import QUIET, Reporter
from modelpress.prune.global_ import GlobalConfig, GlobalPrune
from modelpress.prune.placement import Assignment, Device, assign
from modelpress.targets import Target

__all__ = [
    "ClasswiseConfig",
    "ClasswisePrune",
    "ClasswiseResult",
    "ConcatCombiner",
    "FusionHead",
    "balanced_subsets",
    "classwise_split",
    "onnx_predict",
]

Rule = Literal["concat", "fusion"]

# prune.global settings for sub-models (``prune`` overrides them key by key): small sub-models of a small model
# need exact widths (rounding to 8 undid most of the last iteration's embedding removals on the digits ViT) and
# more, smaller iterations; whole blocks stay (prune.global over-counted their savings and missed 0.1 by 40%)
PRUNE_DEFAULTS: dict[str, Any] = {"iterations": 8, "kinds": ["head", "head_dim", "mlp", "embedding", "conv"],
                                  "round_to": {"mlp": 1, "head_dim": 1, "embedding": 1, "conv": 1}}
RULES: tuple[Rule, ...] = ("concat", "fusion")


class ClasswiseConfig(PassConfig):
    """Settings of a class-wise split (the ``prune.classwise`` pass and :func:`classwise_split`)."""

    k: int | None = Field(None, ge=1)  # number of subsets, balanced automatically
    subsets: list[list[int]] | None = None  # or the subsets themselves (class indices)
    ratio: float = Field(0.25, gt=0.0, le=1.0)  # each sub-model keeps this fraction of the full model's params
    saliency: Literal["magnitude", "taylor", "hessian", "obd"] = "hessian"
    prune: dict[str, Any] = Field(default_factory=dict)  # prune.global settings over PRUNE_DEFAULTS
    recover_steps: int = Field(200, ge=0)
    recover_lr: float = Field(5e-4, gt=0)
    recover_data: Literal["subset", "all"] = "subset"  # all: distil the subset's logits on every train sample
    batch_size: int = Field(32, ge=1)
    label_weight: float = Field(0.0, ge=0.0, le=1.0)
    fusion_hidden: int = Field(32, ge=0)
    fusion_steps: int = Field(300, ge=1)
    fusion_lr: float = Field(1e-2, gt=0)
    fusion_data: Literal["calibration", "train"] = "calibration"
    devices: list[dict[str, Any]] = Field(default_factory=list)  # name, memory_mb, target | latency_ms

    @field_validator("prune")
    @classmethod
    def _prune_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = {"ratio", "saliency", "label_weight"} & set(value)
        if clash:
            raise ValueError(f"set {sorted(clash)} at the top level, not under prune")
        GlobalConfig(**{**PRUNE_DEFAULTS, **value})  # unknown keys and bad values fail here, before anything runs
        return value

    def model_post_init(self, __context: object) -> None:
        if self.k is None and self.subsets is None:
            raise ValueError("give k (balanced subsets) or subsets")
        if self.k is not None and self.subsets is not None and len(self.subsets) != self.k:
            raise ValueError(f"k is {self.k} but {len(self.subsets)} subsets are given")
        for d in self.devices:
            Device.parse(d)
        if self.recover_data == "all" and self.label_weight > 0:
            raise ValueError("recover_data 'all' distils only (other classes' samples have no subset label): "
                             "set label_weight 0")


# ------------------------------------------------------------------------------------------------ subsets


def balanced_subsets(num_classes: int, k: int) -> list[list[int]]:
    """``k`` contiguous runs of ``range(num_classes)`` whose sizes differ by at most one."""
    if k < 1:
        raise ModelpressError(f"K must be at least 1, got {k}", "give k >= 1")
    if k > num_classes:
        raise ModelpressError(f"K = {k} is more than the model's {num_classes} classes",
                              f"give k <= {num_classes} (each sub-model needs at least one class)")
    return [[int(c) for c in part] for part in np.array_split(np.arange(num_classes), k)]


def _check_subsets(subsets: Sequence[Sequence[int]], num_classes: int) -> list[list[int]]:
    out = [sorted(int(c) for c in s) for s in subsets]
    if len(out) > num_classes:
        raise ModelpressError(f"K = {len(out)} is more than the model's {num_classes} classes",
                              f"give at most {num_classes} subsets")
    if any(not s for s in out):
        raise ModelpressError("a class subset is empty", "give every subset at least one class")
    flat = [c for s in out for c in s]
    bad = sorted({c for c in flat if not 0 <= c < num_classes})
    if bad:
        raise ModelpressError(f"classes {bad} are outside the model's 0..{num_classes - 1}", "fix the subsets")
    twice = sorted({c for c in flat if flat.count(c) > 1})
    missing = sorted(set(range(num_classes)) - set(flat))
    if twice or missing:
        raise ModelpressError(
            f"the subsets must cover every class exactly once (twice: {twice}, missing: {missing})",
            "list each class index in exactly one subset",
        )
    return out


def classifier_group(graph: ModelGraph, task: Any) -> tuple[Group, int]:
    """The group of the classifier's output rows and the number of classes; ModelpressError if none."""
    if task is None or getattr(task, "name", "") != "classification":
        name = getattr(task, "name", None) or "none"
        raise ModelpressError(f"class-wise pruning needs a classifier, and the task is {name!r}",
                              "use it on an image or text classifier (task: classification)")
    out = graph.forward(graph.example_inputs(2))
    if out.ndim != 2:
        raise ModelpressError(
            f"{graph.name} has no classifier: its output has shape {tuple(out.shape)}, not [batch, classes]",
            "use class-wise pruning on a model that ends in a classification layer",
        )
    num_classes = int(out.shape[1])
    found = [g for g in graph.groups
             if g.kind == "channel" and g.meta.get("at_output") and not g.meta.get("fixed") and g.size == num_classes]
    if len(found) != 1:
        raise ModelpressError(
            f"{graph.name} has no classifier layer whose rows modelpress can select "
            f"({len(found)} candidate output groups of {num_classes} units)",
            "use class-wise pruning on a model that ends in a linear classifier",
        )
    return found[0], num_classes


def _restricted(graph: ModelGraph, group: Group, classes: list[int]) -> ModelGraph:
    """A copy whose classifier keeps only ``classes``' rows: it outputs ``logits[:, classes]`` exactly."""
    out = graph.copy()
    drop = sorted(set(range(group.size)) - set(classes))
    out.remove_many([(group.name, drop)], force=True)
    out.name = f"{graph.name}-classes-{'_'.join(map(str, classes))}"
    return out


# ------------------------------------------------------------------------------------------------ data


@torch.no_grad()
def _logits(module: nn.Module, names: list[str], split: DataSplit) -> np.ndarray:
    from modelpress.data import torch_runner

    run = torch_runner(module, names)
    return np.concatenate([run(b) for b in split.numpy_batches()], axis=0)


def _sample_classes(split: DataSplit, reference: ModelGraph) -> np.ndarray:
    """Each sample's class: its label, or the reference's prediction when the split has no labels."""
    labels = split.all_labels()
    if labels is not None:
        return labels.astype(np.int64)
    return _logits(reference.module, list(reference.input_spec.names), split).argmax(axis=1)


def _rows(split: DataSplit) -> list[tuple[int, int]]:
    return [(b, i) for b, batch in enumerate(split.batches) for i in range(int(next(iter(batch.values())).shape[0]))]


def _select(split: DataSplit, keep: np.ndarray, labels: np.ndarray, batch_size: int) -> DataSplit:
    """The samples ``keep`` (indices in sample order) with ``labels`` (one per kept sample), rebatched to
    ``batch_size`` when every batch has one shape per input, else filtered batch by batch."""
    keys = list(split.batches[0])
    same = all(len({tuple(b[k].shape[1:]) for b in split.batches}) == 1 for k in keys)
    if same:
        full = {k: torch.cat([b[k] for b in split.batches]) for k in keys}
        idx = torch.as_tensor(keep, dtype=torch.long)
        lab = torch.as_tensor(labels, dtype=torch.long)
        batches, labs = [], []
        for s in range(0, len(keep), batch_size):
            batches.append({k: v[idx[s:s + batch_size]].contiguous() for k, v in full.items()})
            labs.append(lab[s:s + batch_size])
        return DataSplit(batches, labs)
    rows = _rows(split)
    by_batch: dict[int, list[tuple[int, int]]] = {}
    for j, i in enumerate(keep):
        b, r = rows[int(i)]
        by_batch.setdefault(b, []).append((r, j))
    batches, labs = [], []
    for b, pairs in sorted(by_batch.items()):
        r = torch.as_tensor([p[0] for p in pairs])
        batches.append({k: v[r] for k, v in split.batches[b].items()})
        labs.append(torch.as_tensor(labels[[p[1] for p in pairs]], dtype=torch.long))
    return DataSplit(batches, labs)


def _subset_split(split: DataSplit, classes_of: np.ndarray, subset: list[int], batch_size: int) -> DataSplit:
    """The samples of ``split`` whose class is in ``subset``, labelled with their index within it."""
    local = {c: i for i, c in enumerate(subset)}
    keep = np.flatnonzero(np.isin(classes_of, subset))
    return _select(split, keep, np.array([local[int(c)] for c in classes_of[keep]], dtype=np.int64), batch_size)


def _train_split(data: TaskData) -> DataSplit:
    try:
        return data.train
    except ModelpressError:
        return data.calibration


# ------------------------------------------------------------------------------------------------ combiners


class ConcatCombiner(nn.Module):
    """Calibrated concatenation: sub-model k's logits ``/ T_k + b_k``, concatenated, in the original class
    order. Takes the K sub-models' logits as K inputs."""

    def __init__(self, subsets: list[list[int]], temperatures: Sequence[float], offsets: Sequence[float]) -> None:
        super().__init__()
        order = [c for s in subsets for c in s]
        scale = torch.cat([torch.full((len(s),), 1.0 / float(t)) for s, t in zip(subsets, temperatures, strict=True)])
        shift = torch.cat([torch.full((len(s),), float(b)) for s, b in zip(subsets, offsets, strict=True)])
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.register_buffer("index", torch.as_tensor(np.argsort(order), dtype=torch.long))

    def forward(self, *logits: torch.Tensor) -> torch.Tensor:
        z = torch.cat(logits, dim=1) * self.scale + self.shift
        return z.index_select(1, self.index)


class FusionHead(nn.Module):
    """ED-ViT's fusion: the K sub-models' logits, concatenated and standardized, through a small MLP (a
    linear layer when ``hidden`` is 0) to logits over all classes."""

    def __init__(self, width: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        else:
            self.net = nn.Linear(width, num_classes)
        self.hidden = hidden

    def forward(self, *logits: torch.Tensor) -> torch.Tensor:
        return self.net((torch.cat(logits, dim=1) - self.mean) / self.std)


def _fit_concat(parts: list[torch.Tensor], subsets: list[list[int]], target: torch.Tensor,
                prior: float = 0.01) -> ConcatCombiner:
    """Temperatures and offsets (b_0 = 0) minimizing the NLL of the concatenated softmax (L-BFGS), plus
    ``prior * (sum log(T_k)^2 + sum b_k^2)``: on separable calibration data the NLL alone drives the
    temperatures to 0 (on 64 digits the fit reached T = 0.007 and cost 3 points of held-out accuracy)."""
    k = len(parts)
    log_t = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(max(k - 1, 0), dtype=torch.float64, requires_grad=True)
    order = torch.as_tensor(np.argsort([c for s in subsets for c in s]), dtype=torch.long)
    x = [p.double() for p in parts]
    params = [log_t] + ([bias] if k > 1 else [])
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        shifts = torch.cat([torch.zeros(1, dtype=torch.float64), bias])
        z = torch.cat([x[i] * torch.exp(-log_t[i]) + shifts[i] for i in range(k)], dim=1).index_select(1, order)
        loss = nn.functional.cross_entropy(z, target) + prior * (log_t.square().sum() + bias.square().sum())
        loss.backward()
        return loss

    opt.step(closure)
    temps = torch.exp(log_t.detach()).tolist()
    offsets = [0.0, *bias.detach().tolist()]
    return ConcatCombiner(subsets, temps, offsets)


def _fit_fusion(parts: list[torch.Tensor], target: torch.Tensor, num_classes: int, hidden: int, steps: int,
                lr: float, seed: int) -> FusionHead:
    """A FusionHead trained by cross-entropy on ``parts`` (full batch, Adam), deterministic for ``seed``."""
    x = torch.cat(parts, dim=1).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = FusionHead(x.shape[1], num_classes, hidden)
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0).clamp_min(1e-3) if len(x) > 1 else torch.ones(x.shape[1]))
    opt = torch.optim.Adam(head.net.parameters(), lr=lr, weight_decay=1e-4)
    head.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(*parts), target)
        loss.backward()
        opt.step()
    return head.eval()


# ------------------------------------------------------------------------------------------------ result


@dataclass
class SubModel:
    """One sub-model: its graph, its classes (sorted; its output j is class ``classes[j]``) and its numbers."""

    name: str
    graph: ModelGraph
    classes: list[int]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClasswiseResult:
    """A class-wise split: the sub-models, both combiners, the assignment and the report."""

    sub_models: list[SubModel]
    num_classes: int
    concat: ConcatCombiner
    fusion: FusionHead
    assignment: Assignment
    report: dict[str, Any]
    check_batch: dict[str, torch.Tensor] | None = None  # inputs that save() checks ONNX against torch on

    @property
    def subsets(self) -> list[list[int]]:
        return [s.classes for s in self.sub_models]

    def combiner(self, rule: Rule) -> nn.Module:
        if rule not in RULES:
            raise ModelpressError(f"unknown combination rule {rule!r}", f"use one of {', '.join(RULES)}")
        return self.concat if rule == "concat" else self.fusion

    @torch.no_grad()
    def sub_logits(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each sub-model's logits (over its own classes) for one batch of model inputs."""
        return [s.graph.forward(inputs).float() for s in self.sub_models]

    @torch.no_grad()
    def predict(self, inputs: dict[str, torch.Tensor], rule: Rule = "fusion") -> torch.Tensor:
        """Logits over all classes (original order) for one batch, combined by ``rule``, in torch."""
        return self.combiner(rule)(*self.sub_logits(inputs))

    def save(self, out_dir: str | Path, *, opset: int = 17) -> Path:
        """Write the split into ``out_dir`` (see the module docstring), atomically: a temporary folder beside
        it, renamed when everything is written and the combined ONNX prediction matched torch's."""
        from modelpress.models import saving

        out = Path(out_dir)
        with saving.staged_dir(out, overwrite=True) as tmp:
            files = {}
            for s in self.sub_models:
                folder = tmp / s.name
                folder.mkdir()
                saving.write_into(s.graph, folder)
                path = _export_graph(s.graph, folder / "model.onnx", opset)
                files[s.name] = {"onnx": f"{s.name}/model.onnx", "onnx_bytes": path.stat().st_size}
            names = [f"logits_{i}" for i in range(len(self.sub_models))]
            widths = [len(s.classes) for s in self.sub_models]
            for rule in RULES:
                _export_combiner(self.combiner(rule), widths, names, tmp / f"{rule}.onnx", opset)
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in self.fusion.state_dict().items()},
                      str(tmp / "fusion.safetensors"))
            combine = {
                "num_classes": self.num_classes,
                "inputs": self.sub_models[0].graph.input_spec.names,
                "sub_models": [{"name": s.name, "classes": s.classes, "onnx": files[s.name]["onnx"],
                                "combiner_input": names[i]} for i, s in enumerate(self.sub_models)],
                "concat": {"onnx": "concat.onnx", "temperatures": (1.0 / self._per_model(self.concat.scale)).tolist(),
                           "offsets": self._per_model(self.concat.shift).tolist(),
                           "rule": "argmax over concat_k(logits_k / T_k + b_k), in the original class order"},
                "fusion": {"onnx": "fusion.onnx", "weights": "fusion.safetensors", "hidden": self.fusion.hidden,
                           "rule": "argmax of MLP((concat_k logits_k - mean) / std)"},
            }
            (tmp / "combine.json").write_text(json.dumps(combine, indent=2))
            sub_names = [s.name for s in self.sub_models]
            (tmp / "assignment.json").write_text(json.dumps(self.assignment.to_dict(sub_names), indent=2))
            (tmp / "assignment.txt").write_text(self.assignment.to_text(sub_names))
            report = dict(self.report)
            report["files"] = files
            if self.check_batch is not None:
                report["onnx_check"] = self._onnx_check(tmp)
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable))
        return out

    def _per_model(self, values: torch.Tensor) -> np.ndarray:
        starts = np.cumsum([0] + [len(s.classes) for s in self.sub_models])[:-1]
        return values.detach().numpy()[starts].astype(np.float64)

    def _onnx_check(self, folder: Path) -> dict[str, Any]:
        """The combined prediction from the ONNX files against torch's, on ``check_batch``."""
        batch = {k: v.detach().cpu().numpy() for k, v in self.check_batch.items()}
        out: dict[str, Any] = {"samples": int(next(iter(batch.values())).shape[0])}
        for rule in RULES:
            a = onnx_predict(folder, batch, rule)
            b = self.predict(self.check_batch, rule).numpy()
            err = float(np.abs(a - b).max())
            same = bool((a.argmax(1) == b.argmax(1)).all())
            if not same or err > 1e-3 * max(1.0, float(np.abs(b).max())):
                raise ModelpressError(
                    f"the ONNX class-wise split ({rule}) disagrees with torch (max abs error {err:.2e})",
                    "report this: the export of a sub-model or combiner is wrong",
                )
            out[rule] = {"max_abs_err": err, "argmax_equal": same}
        return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    return str(obj)


def _export_graph(graph: ModelGraph, path: Path, opset: int) -> Path:
    from modelpress.export import export_onnx

    return Path(export_onnx(graph.module, graph.input_spec, path, optimize="none", opset=opset).path)


def _export_combiner(module: nn.Module, widths: list[int], names: list[str], path: Path, opset: int) -> None:
    import contextlib
    import io
    import warnings

    args = tuple(torch.zeros(2, w) for w in widths)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=names, output_names=["logits"],
                          dynamic_axes={**{n: {0: "batch"} for n in names}, "logits": {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def onnx_predict(folder: str | Path, batch: dict[str, np.ndarray], rule: Rule = "fusion",
                 threads: int | None = None) -> np.ndarray:
    """Logits over all classes from a saved split, in ONNX Runtime: every sub-model's ONNX file on ``batch``,
    then the ``rule``'s combiner (``fusion.onnx`` or ``concat.onnx``)."""
    from modelpress.data import onnx_runner
    from modelpress.targets import cpu_session

    folder = Path(folder)
    if rule not in RULES:
        raise ModelpressError(f"unknown combination rule {rule!r}", f"use one of {', '.join(RULES)}")
    try:
        spec = json.loads((folder / "combine.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelpressError(f"{folder} is not a saved class-wise split ({exc})", "save one with ClasswiseResult.save") from exc
    feed = {}
    for sub in spec["sub_models"]:
        feed[sub["combiner_input"]] = onnx_runner(folder / sub["onnx"], threads)(batch)
    session = cpu_session(folder / spec[rule]["onnx"], threads)
    return np.asarray(session.run(["logits"], feed)[0], dtype=np.float32)


# ------------------------------------------------------------------------------------------------ split


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
    combiners and place the sub-models on ``devices``; see the module docstring.

    ``config`` or ``settings`` (the fields of :class:`ClasswiseConfig`: k or subsets, ratio, saliency,
    recover_steps, ...). ``data``: calibration (saliency, combiners), evaluation (every accuracy in the
    report) and train (recovery; the calibration split when there is none). ``devices``: Devices (or their
    recipe mappings); default: one device per sub-model on ``target`` (ort-cpu), memory unlimited.
    ``latency_model``: for prune settings with a latency target. Everything is checked before the work starts.
    """
    if config is None:
        try:
            config = ClasswiseConfig(**settings)
        except ValueError as exc:
            raise ModelpressError(f"invalid class-wise settings: {exc}", "see ClasswiseConfig") from exc
    elif settings:
        try:
            config = ClasswiseConfig(**{**config.model_dump(), **settings})
        except ValueError as exc:
            raise ModelpressError(f"invalid class-wise settings: {exc}", "see ClasswiseConfig") from exc
    cfg = config
    group, num_classes = classifier_group(graph, task)
    subsets = _check_subsets(cfg.subsets, num_classes) if cfg.subsets is not None else balanced_subsets(
        num_classes, int(cfg.k))
    device_list = [Device.parse(d) for d in (devices if devices is not None else cfg.devices)]
    if not device_list:
        tgt = target or "ort-cpu"
        tgt_name = tgt if isinstance(tgt, str) else tgt.name
        device_list = [Device(f"{tgt_name}-{i}", None, tgt) for i in range(len(subsets))]
    for d in device_list:
        if d.latency_ms is not None and len(d.latency_ms) != len(subsets):
            raise ModelpressError(f"device {d.name!r} gives {len(d.latency_ms)} latencies for {len(subsets)} "
                                  "sub-models", "give one latency per sub-model, in the subsets' order")
    if data is None or data.calibration is None or data.evaluation is None:
        raise ModelpressError("class-wise pruning needs data (calibration and evaluation)", "give the run --data")

    names = list(graph.input_spec.names)
    train_split = _train_split(data)
    fusion_split = train_split if cfg.fusion_data == "train" else data.calibration
    classes_of = {
        "calibration": _sample_classes(data.calibration, graph),
        "evaluation": _sample_classes(data.evaluation, graph),
        "train": _sample_classes(train_split, graph),
    }
    if fusion_split is train_split:
        classes_of["fusion"] = classes_of["train"]
    else:
        classes_of["fusion"] = classes_of["calibration"]
    for split_name in ("calibration", "train"):
        present = set(classes_of[split_name].tolist())
        empty = [i for i, s in enumerate(subsets) if not present & set(s)]
        if empty:
            raise ModelpressError(
                f"the {split_name} data has no samples of subset(s) {empty} (classes {[subsets[i] for i in empty]})",
                "give more calibration/train data, or other subsets",
            )
    labelled = data.evaluation.labels is not None
    full_params = graph.num_parameters()
    full_acc = float((_logits(graph.module, names, data.evaluation).argmax(1) == classes_of["evaluation"]).mean())
    reporter.log(f"class-wise split of {graph.name} ({num_classes} classes) into {len(subsets)} sub-models: "
                 f"{subsets}")
    job = _Job(graph, group, task, cfg, data, train_split, classes_of, labelled, seed, reporter, latency_model)
    with tempfile.TemporaryDirectory(prefix="modelpress-classwise-") as scratch:
        subs = [job.sub_model(f"sub{i}", subset, Path(scratch)) for i, subset in enumerate(subsets)]
        latencies = _latencies(subs, device_list, Path(scratch), reporter)

    fit_parts = [torch.from_numpy(_logits(s.graph.module, names, fusion_split)) for s in subs]
    fit_target = torch.as_tensor(classes_of["fusion"], dtype=torch.long)
    concat = _fit_concat(fit_parts, subsets, fit_target)
    fusion = _fit_fusion(fit_parts, fit_target, num_classes, cfg.fusion_hidden, cfg.fusion_steps, cfg.fusion_lr,
                         seed)
    eval_parts = [torch.from_numpy(_logits(s.graph.module, names, data.evaluation)) for s in subs]
    uncalibrated = ConcatCombiner(subsets, [1.0] * len(subs), [0.0] * len(subs))
    with torch.no_grad():
        acc = {rule: float((comb(*eval_parts).argmax(1).numpy() == classes_of["evaluation"]).mean())
               for rule, comb in (("concat", concat), ("fusion", fusion), ("uncalibrated", uncalibrated))}
    placement = assign(latencies, [s.info["memory_bytes"] for s in subs], device_list, [s.name for s in subs])
    for i, s in enumerate(subs):
        s.info["latency_ms"] = {d.name: latencies[i][j] for j, d in enumerate(device_list)}
        s.info["device"] = placement.device[i]
    metric = "accuracy" if labelled else "agreement"
    result = ClasswiseResult(subs, num_classes, concat, fusion, placement, {},
                             check_batch=data.evaluation.batches[0])
    result.report = {
        "method": "prune.classwise (ED-ViT class-wise split)",
        "settings": cfg.model_dump(mode="json"),
        "seed": seed,
        "subsets": subsets,
        "full": {"params": full_params, metric: full_acc},
        "sub_models": [{"name": s.name, **s.info} for s in subs],
        "total_params": sum(s.info["params"] for s in subs),
        "largest_sub_model_reduction": full_params / max(s.info["params"] for s in subs),
        "combined": {
            "metric": metric,
            "samples": len(data.evaluation),
            "concat": {metric: acc["concat"], "uncalibrated": acc["uncalibrated"],
                       "temperatures": (1.0 / result._per_model(concat.scale)).tolist(),
                       "offsets": result._per_model(concat.shift).tolist()},
            "fusion": {metric: acc["fusion"], "hidden": cfg.fusion_hidden, "steps": cfg.fusion_steps},
            "full_model": full_acc,
            "fitted_on": f"{cfg.fusion_data} ({len(fusion_split)} samples)",
        },
        "assignment": placement.to_dict([s.name for s in subs]),
    }
    reporter.log(f"combined {metric}: concat {acc['concat']:.3f} (uncalibrated {acc['uncalibrated']:.3f}), "
                 f"fusion {acc['fusion']:.3f}; full model {full_acc:.3f}")
    return result


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
        from modelpress.train import TrainConfig, train

        cfg, rep, bs = self.cfg, self.reporter, self.cfg.batch_size
        names = list(self.graph.input_spec.names)
        sub_data = TaskData(
            calibration=_subset_split(self.data.calibration, self.classes_of["calibration"], subset, bs),
            evaluation=_subset_split(self.data.evaluation, self.classes_of["evaluation"], subset, bs),
            description=f"{getattr(self.data, 'description', 'data')}, classes {subset}",
            make_train=lambda: _subset_split(self.train_split, self.classes_of["train"], subset, bs),
        )
        reference = _restricted(self.graph, self.group, subset)
        info: dict[str, Any] = {"classes": subset, "samples": {
            "calibration": len(sub_data.calibration), "evaluation": len(sub_data.evaluation),
            "train": len(sub_data.train)}}
        full_params = self.graph.num_parameters()
        ratio = cfg.ratio * full_params / reference.num_parameters()  # of the restricted copy
        sub = reference.copy()
        if ratio < 1.0:
            with rep.step(f"{name}: classes {subset}, pruning to {cfg.ratio:g} of the parameters"):
                ctx = Context(workdir=scratch / name, task=self.task, data=sub_data, reference=reference,
                              seed=self.seed, reporter=rep, latency_model=self.latency_model)
                gcfg = GlobalConfig(**{**PRUNE_DEFAULTS, **cfg.prune, "ratio": ratio, "saliency": cfg.saliency,
                                       "label_weight": cfg.label_weight})
                pruned = GlobalPrune(gcfg).apply(reference, ctx)
                sub = pruned.graph
                info["prune"] = {k: pruned.metrics[k] for k in ("ratio_reached", "widths", "embedding")
                                 if k in pruned.metrics}
            if cfg.recover_steps:
                steps = cfg.recover_steps
                recover = sub_data.train if cfg.recover_data == "subset" else DataSplit(self.train_split.batches)
                with rep.step(f"{name}: recovering {steps} steps on {len(recover)} samples"):
                    tc = TrainConfig(steps=steps, lr=cfg.recover_lr, warmup_steps=min(steps // 10, steps - 1),
                                     seed=self.seed, label_weight=cfg.label_weight, batch_size=bs,
                                     log_every=max(1, steps // 4))
                    res = train(sub.module, recover, task=self.task, teacher=reference.module, config=tc,
                                reporter=rep, input_names=names)
                    sub.module.eval()
                    info["recovery"] = {"steps": res.steps, "final_loss": res.final_loss}
        sub.name = f"{self.graph.name}-{name}"
        labels = sub_data.evaluation.all_labels()
        key = "subset_accuracy" if self.labelled else "subset_agreement"
        params = sub.num_parameters()
        info.update({
            "params": params,
            "params_fraction": params / full_params,
            "params_reduction": full_params / params,
            "memory_bytes": _weight_bytes(sub.module),
            key: float((_logits(sub.module, names, sub_data.evaluation).argmax(1) == labels).mean()),
            f"{key}_unpruned": float((_logits(reference.module, names, sub_data.evaluation).argmax(1) == labels).mean()),
        })
        rep.log(f"  {name}: {params:,} parameters ({full_params / params:.1f}x smaller), "
                f"{key} {info[key]:.3f} (unpruned {info[key + '_unpruned']:.3f})")
        return SubModel(name, sub, subset, info)


def _weight_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _latencies(subs: list[SubModel], devices: list[Device], scratch: Path, reporter: Reporter) -> list[list[float]]:
    """[sub-model][device] latency in ms: given, or measured at batch 1 on each distinct target once."""
    from modelpress.bench import get_target, measure

    out = np.zeros((len(subs), len(devices)))
    measured: dict[tuple[str, int], list[float]] = {}
    files: dict[str, Path] = {}
    for j, d in enumerate(devices):
        if d.latency_ms is not None:
            out[:, j] = d.latency_ms
            continue
        tgt = get_target(d.target or "ort-cpu")
        key = (tgt.name, tgt.threads)
        if key not in measured:
            if not files:
                for s in subs:
                    files[s.name] = _export_graph(s.graph, scratch / f"{s.name}.onnx", 17)
            with reporter.step(f"measuring {len(subs)} sub-models on {tgt.name} (batch 1)"):
                bench = measure(files, subs[0].graph.input_spec, tgt, batch_sizes=[1], memory=False)
            measured[key] = [bench.stats(s.name, 1).median_ms for s in subs]
        out[:, j] = measured[key]
    return out.tolist()


# ------------------------------------------------------------------------------------------------ the pass


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
        combined = result.report["combined"]
        summary = {
            "output": "classwise/",
            "subsets": result.subsets,
            "sub_models": [{k: s.info[k] for k in ("params", "params_reduction", "latency_ms", "device")}
                           for s in result.sub_models],
            "combined": {"metric": combined["metric"], "full_model": combined["full_model"],
                         "concat": combined["concat"][combined["metric"]],
                         "fusion": combined["fusion"][combined["metric"]]},
            "makespan_ms": result.assignment.makespan_ms,
        }
        return PassResult(graph=graph, metrics={"classwise": summary})
