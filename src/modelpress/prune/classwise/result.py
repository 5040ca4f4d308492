"""A finished split: its sub-models and combiners, saved as ONNX files (checked against torch) and run
in ONNX Runtime."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.prune.classwise.combiners import ConcatCombiner, FusionHead
from modelpress.prune.classwise.config import RULES, Rule
from modelpress.prune.placement import Assignment


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
        """Write the split into ``out_dir`` (see the package docstring), atomically: a temporary folder beside
        it, renamed when everything is written and the combined ONNX prediction matched torch's."""
        from modelpress.models import saving

        out = Path(out_dir)
        with saving.staged_dir(out, overwrite=True) as tmp:
            files = {}
            for s in self.sub_models:
                folder = tmp / s.name
                folder.mkdir()
                saving.write_into(s.graph, folder)
                path = export_graph(s.graph, folder / "model.onnx", opset)
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
                "concat": {"onnx": "concat.onnx", "temperatures": (1.0 / self.per_model(self.concat.scale)).tolist(),
                           "offsets": self.per_model(self.concat.shift).tolist(),
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

    def per_model(self, values: torch.Tensor) -> np.ndarray:
        """One value per sub-model from a per-class vector (its first class's)."""
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


def export_graph(graph: ModelGraph, path: Path, opset: int) -> Path:
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
