"""Evaluating candidates: quality on held-out data, latency on the target (measured in ONNX Runtime, or
predicted by the block latency model and the measured per-layer precision table), and size. Every extracted
sub-network with narrowed widths is reconstructed (:mod:`modelpress.reconstruct`) before it is scored.

Precision genes go through the quantize pass found by name in the passes registry (``quantize.repq`` by
default, its per-layer ``policy``), never by importing it; an INT8 candidate scored with the ONNX backend is
the real QDQ INT8 graph the pass's exporter writes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import ModelpressError
from modelpress.passes import Context, registered_passes
from modelpress.search.supernet import SuperNet

OBJECTIVES = {"quality": "max", "latency": "min", "size": "min"}
LATENCY_MODES = ("predicted", "measured")
RECONSTRUCT_TARGETS = ("stream", "layer")
UNITS = {"quality": "", "latency": "ms", "size": "MB"}
QUALITY_METRICS = ("accuracy", "fidelity_mean", "agreement")
QUALITY_RANGES = {"accuracy": (0.0, 1.0), "fidelity_mean": (-1.0, 1.0), "agreement": (0.0, 1.0)}
PRECISION_SPEC = {"int8": "w8a8", "w4a8": "w4a8"}
BYTES = {"float": 4.0, "int8": 1.0, "w4a8": 0.5}
# RepQ's scale reparameterization wherever a norm's readers share one precision; one gene per Linear can
# split them (q float, k INT8), and such a norm keeps per-tensor input scales ("skip"). MiniLM, full INT8,
# 48 held-out sentences: fidelity 0.9922 without reparameterization, 0.9944 with it, at the same cost.
# ``keep_faster`` off: a candidate is exactly the precision its genes say (the quantize pass's speed guard would
# hand a slower INT8 layer back to float behind the search's back, and its own timing cost 10 s per export).
FAST_REPQ = {"samples": 64, "reconstruction": "none", "act_observer": "minmax", "weight_observer": "minmax",
             "reparam": True, "mixed_norm_readers": "skip", "keep_faster": False}


def check_objectives(objectives: list[str]) -> list[str]:
    """Validate the user's objectives (at least two, known, no repeats)."""
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise ModelpressError(f"unknown objective {', '.join(map(repr, unknown))}",
                              f"choose from {', '.join(OBJECTIVES)}")
    if len(set(objectives)) != len(objectives) or len(objectives) < 2:
        raise ModelpressError(f"objectives {objectives} must be two or three different ones",
                              "e.g. --objectives quality,latency")
    return list(objectives)


def check_latency_mode(latency: str) -> str:
    """Validate the latency mode: predicted by the latency model, or measured in ONNX Runtime."""
    if latency not in LATENCY_MODES:
        raise ModelpressError(f"unknown latency mode {latency!r}", f"choose {' or '.join(LATENCY_MODES)}")
    return latency


@dataclass(frozen=True)
class EvalSettings:
    """How candidates are evaluated (JSON-ready: it goes into the run's ``search.json``, written once)."""

    objectives: list[str]
    latency: str = "measured"  # or "predicted" (the latency model; the reported front is still measured)
    precision_pass: str = "quantize.repq"
    precision_config: dict[str, Any] = field(default_factory=lambda: dict(FAST_REPQ))
    reconstruct: bool = True  # layer-wise least squares on the calibration split after every extraction
    reconstruct_target: str = "stream"  # a residual writer refits to the original stream's value ("layer": its output)
    reconstruct_samples: int = 512  # train-split samples added to the calibration rows of every refit
    batch: int = 1  # the latency objective's batch size (a compute-bound batch for small models)
    seq: int | None = None  # its sequence length (text models; None: the target's first)
    rounds: int = 3  # interleaved rounds of every latency measurement

    @property
    def measured(self) -> bool:
        """Latency is an objective measured on the target for every candidate."""
        return self.latency == "measured" and "latency" in self.objectives

    @property
    def quality_backend(self) -> str:
        """``onnx`` (score the file that is timed) with measured latency, else ``torch``."""
        return "onnx" if self.measured else "torch"


class Evaluator:
    """Scores sub-network configs of one super-network in one Context. ``latency_model`` (a block table) and
    ``precision_table`` (:class:`~modelpress.search.precision.PrecisionTable`) predict latency; only the
    driver holds them (workers score quality and export)."""

    def __init__(self, net: SuperNet, ctx: Context, settings: EvalSettings, latency_model: Any = None,
                 precision_table: Any = None) -> None:
        check_objectives(settings.objectives)
        check_latency_mode(settings.latency)
        self.net, self.ctx, self.settings = net, ctx, settings
        self.latency_model, self.precision_table = latency_model, precision_table
        self._axes = _param_axes(net)
        self.reconstruct_seconds: list[float] = []  # the cost of reconstruction, one entry per extraction
        self.reconstruct_kept: list[bool] = []  # whether it lowered the held-aside batch's error (else undone)
        self._full_ms: float | None = None
        self._fit: tuple[list[dict[str, Any]], dict[str, Any]] | None = None

    # ----- cheap, analytic objectives (no model built)
    def param_counts(self, config: dict[str, Any]) -> dict[str, float]:
        """Elements of every parameter of the extracted sub-network, computed from the config alone."""
        kept = {g.name: k for g, k in self.net.cuts(config)}
        skipped = self.net.skipped(config)
        out = {}
        for name, (numel, cuts) in self._axes.items():
            if any(name.startswith(p + ".") for p in skipped):
                continue
            n = float(numel)
            for gname, size in cuts:
                n *= kept.get(gname, size) / size
            out[name] = n
        return out

    def size_mb(self, config: dict[str, Any], counts: dict[str, float] | None = None) -> float:
        counts = self.param_counts(config) if counts is None else counts
        prec = config.get("precision") or {}
        total = 0.0
        for name, n in counts.items():
            layer, _, attr = name.rpartition(".")
            total += n * BYTES[prec.get(layer, "float") if attr == "weight" else "float"]
        return total / 2**20

    def predicted_latency(self, config: dict[str, Any], counts: dict[str, float] | None = None) -> float:
        """Latency model: per kept block its table latency at its widths, plus the rest of the model; every
        Linear in a lower precision subtracts what the precision table measured for its layer kind in that
        precision (a share of the full float model's latency), scaled by the share of its weights kept."""
        table = self.latency_model
        if table is None:
            raise ModelpressError("no latency model to predict with")
        counts = self.param_counts(config) if counts is None else counts
        prec = config.get("precision") or {}
        if any(p != "float" for p in prec.values()) and self.precision_table is None:
            raise ModelpressError("predicting the latency of lower precisions needs the measured precision table")
        embed = config.get("embed") or table.architecture["embed"]
        total = table.rest_ms(embed)
        full = self._full_float_ms()
        for b, row in zip(self.net.space.blocks, config["blocks"], strict=True):
            if not row.get("keep", True):
                continue
            heads_per_unit = self.net.graph.group(b.head_group).heads_per_unit if b.head_group else 1
            total += table.block_ms(row.get("heads", 0) * heads_per_unit,
                                    row.get("head_dim", table.architecture["head_dim"]), row.get("mlp", 0), embed)
            for n in self.net.space.precision_layers:
                p = prec.get(n, "float")
                if p == "float" or not n.startswith(b.path + "."):
                    continue
                kept = counts.get(f"{n}.weight", 0.0) / max(self._axes[f"{n}.weight"][0], 1)
                total -= full * self.precision_table.saving(n[len(b.path) + 1:], p) * kept
        return max(total, 0.0)

    def _full_float_ms(self) -> float:
        """The latency model's full float model (what the precision table's shares are shares of)."""
        if self._full_ms is None:
            self._full_ms = 0.0  # the full float config subtracts nothing: no recursion
            self._full_ms = self.predicted_latency(self.net.space.largest("float"))
        return self._full_ms

    def cheap(self, config: dict[str, Any]) -> dict[str, float]:
        """The objectives computable without building the model (size; latency when predicted)."""
        counts = self.param_counts(config)
        out: dict[str, float] = {}
        if "size" in self.settings.objectives:
            out["size"] = self.size_mb(config, counts)
        if "latency" in self.settings.objectives and self.settings.latency == "predicted":
            out["latency"] = self.predicted_latency(config, counts)
        return out

    def cheap_objectives(self) -> list[str]:
        return [o for o in self.settings.objectives
                if o == "size" or (o == "latency" and self.settings.latency == "predicted")]

    # ----- real evaluation
    def build(self, config: dict[str, Any], *, reconstruct: bool | None = None) -> tuple[Any, Any]:
        """The extracted sub-network, reconstructed (its layers that read removed units refit to the
        super-network's outputs on the calibration split, :mod:`modelpress.reconstruct`) unless
        ``reconstruct`` is False, with its precision applied: (graph, exporter or None)."""
        sub = self.net.extract(config)
        if (self.settings.reconstruct if reconstruct is None else reconstruct) and self.net.cuts(config):
            sub = self._reconstructed(sub)
        prec = {k: v for k, v in (config.get("precision") or {}).items() if v != "float"}
        if not prec:
            return sub, None
        policy = {}
        for name, _ in sub.module.named_modules():
            original = sub.original_path(name)
            if original in prec:
                policy[name] = PRECISION_SPEC[prec[original]]
        if not policy:
            return sub, None
        passes = registered_passes()
        if self.settings.precision_pass not in passes:
            raise ModelpressError(f"no pass {self.settings.precision_pass!r} to apply precision with",
                                  "install modelpress with its quantize plugin")
        cls = passes[self.settings.precision_pass]
        cfg = cls.Config(**{**self.settings.precision_config, "default": "float", "policy": policy})
        result = cls(cfg).apply(sub, self.ctx)
        return result.graph, result.exporter

    def _reconstructed(self, sub: Any) -> Any:
        """``sub`` with its readers of removed units refit to the super-network's on :meth:`fit_batches` (the
        calibration split but its last batch, plus train-split samples), kept only when the held-back last
        batch's output error (relative, against the super-network) went down: with few rows per unknown a
        least-squares refit can overfit (on MiniLM with 64 calibration sentences it lowered held-out
        fidelity). ``reconstruct_target`` ``stream``: a residual writer refits to the original stream's value."""
        import time

        from modelpress.reconstruct import reconstruct_graph

        fit, check = self.fit_batches()
        t0 = time.perf_counter()
        plain = sub.copy()
        reconstruct_graph(self.net.graph, sub, fit, residual=self.settings.reconstruct_target == "stream")
        before, after = self._output_error(plain, check), self._output_error(sub, check)
        self.reconstruct_seconds.append(time.perf_counter() - t0)
        self.reconstruct_kept.append(after < before)
        return sub if after < before else plain

    def fit_batches(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(the batches a refit fits on, the held-back batch that checks it): the calibration split's last
        batch is held back; the rest, plus up to ``reconstruct_samples`` train-split samples that are not rows
        of the held-back batch (a train split may hold the calibration samples), are fitted. One calibration
        batch and no train split: it is both."""
        if self._fit is None:
            batches = self.ctx.calibration.batches if self.ctx.calibration is not None else []
            if not batches:
                raise ModelpressError("reconstruction needs calibration data", "give --data, or turn it off")
            check = batches[-1]
            fit = list(batches[:-1]) + _train_rows(self.ctx.train, self.settings.reconstruct_samples, check)
            self._fit = (fit or list(batches), check)
        return self._fit

    def _output_error(self, graph: Any, batch: dict[str, Any]) -> float:
        """Relative squared error of ``graph``'s primary output against the super-network's on ``batch``."""
        import torch

        from modelpress.graph.run import call_module, primary_output

        names = list(self.net.graph.input_spec.names)
        with torch.no_grad():
            ref = primary_output(call_module(self.net.graph.module.eval(), batch, names)).double()
            out = primary_output(call_module(graph.module.eval(), batch, names)).double()
        return float(((out - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-30))

    def export(self, config: dict[str, Any], path: Path | None = None) -> Path:
        """``config`` built and written as verified ONNX (a scratch path unless ``path``)."""
        graph, exporter = self.build(config)
        path = Path(path) if path is not None else self.ctx._scratch("model.onnx")
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(self.ctx.export(graph, path, exporter=exporter).path)

    def quality(self, config: dict[str, Any], *, reconstruct: bool | None = None) -> float:
        """Quality of ``config`` on the held-out split (in torch; see :meth:`evaluate` for the ONNX backend)."""
        graph, _ = self.build(config, reconstruct=reconstruct)
        return pick_quality(self.ctx.evaluate(graph, torch_only=True).metrics)

    def evaluate(self, config: dict[str, Any], *, want_onnx: bool = False) -> dict[str, Any]:
        """Quality of ``config`` (built once: extracted, reconstructed, precision applied; scored on the ONNX
        file that is timed when latency is measured, else in torch) and, when asked or needed for timing, the
        ONNX file's bytes (``onnx``): what a worker returns."""
        graph, exporter = self.build(config)
        out: dict[str, Any] = {"objectives": {}, "onnx": None}
        path = None
        if want_onnx or self.settings.measured:
            path = self.ctx._scratch("model.onnx")
            path = Path(self.ctx.export(graph, path, exporter=exporter).path)
            out["onnx"] = path.read_bytes()
        if "quality" in self.settings.objectives:
            ev = self.ctx.evaluate(path) if self.settings.measured else self.ctx.evaluate(graph, torch_only=True)
            out["objectives"]["quality"] = pick_quality(ev.metrics)
        if path is not None:
            shutil.rmtree(path.parent, ignore_errors=True)  # a scratch folder of its own: the bytes went back
        return out

    def measure_latency(self, onnx: dict[str, Path], baselines: dict[str, Path], reference_ms: float | None = None,
                        rounds: int | None = None) -> dict[str, dict[str, float]]:
        """Latency of ONNX files timed interleaved with the full float and full INT8 models (``baselines``,
        ``full-float`` first) in the same rounds, fresh sessions each round. Per file: ``latency`` (ms at the
        settings' batch and sequence: ``reference_ms`` divided by the median per-round speedup over full float,
        so batches timed under different machine load stay comparable; the full float's own median without a
        reference), ``vs_float`` and ``vs_int8`` (median per-round speedups), ``rounds_vs_float`` and ``rounds_vs_int8``
        (each round's speedup: what :mod:`modelpress.search.consistency` compares). The baselines are reported too."""
        files = {**{f"__{n}__": p for n, p in baselines.items()}, **onnx}
        base = f"__{next(iter(baselines))}__"
        b, seq = self.settings.batch, self.settings.seq
        timing: dict[str, Any] = {"seq_lens": [seq]} if seq else {}
        report = self.ctx.measure(files, baseline=base, rounds=rounds or self.settings.rounds, batch_sizes=[b],
                                  memory=False, min_time_s=0.1, runs=5, **timing)
        ref = report.stats(base, b, seq).median_ms if reference_ms is None else reference_ms
        int8 = "__full-int8__" if "full-int8" in baselines else None
        out: dict[str, dict[str, float]] = {}
        for name in files:
            st = report.stats(name, b, seq)
            row: dict[str, Any] = {"latency": ref / st.speedup if st.speedup else st.median_ms,
                                   "median_ms": st.median_ms, "vs_float": st.speedup,
                                   "rounds_vs_float": list(st.speedup_rounds)}
            if int8 is not None:
                i8 = report.stats(int8, b, seq).round_medians_ms
                row["rounds_vs_int8"] = [a / m for a, m in zip(i8, st.round_medians_ms, strict=True)]
                row["vs_int8"] = float(np.median(row["rounds_vs_int8"]))
            out[name.strip("_") if name.startswith("__") else name] = row
        return out


def _train_rows(train: Any, samples: int, held_back: dict[str, Any]) -> list[dict[str, Any]]:
    """Up to ``samples`` samples of the ``train`` split (None: none) as batches, without the rows of
    ``held_back`` (compared on every input)."""
    import torch

    if train is None or samples <= 0:
        return []
    names = sorted(held_back)

    def rows(batch: dict[str, Any]) -> list[bytes]:
        n = len(batch[names[0]])
        return [b"".join(torch.as_tensor(batch[k][i]).numpy().tobytes() for k in names) for i in range(n)]

    seen, out, total = set(rows(held_back)), [], 0
    for batch in train.batches:
        if total >= samples:
            break
        if sorted(batch) != names:
            continue
        keep = [i for i, r in enumerate(rows(batch)) if r not in seen][: samples - total]
        if keep:
            index = torch.as_tensor(keep)
            out.append({k: v[index] for k, v in batch.items()})
            total += len(keep)
    return out


def pick_quality(metrics: dict[str, float]) -> float:
    """The quality objective among a task's metrics (the first of ``QUALITY_METRICS`` it reports)."""
    for k in QUALITY_METRICS:
        if k in metrics:
            return float(metrics[k])
    raise ModelpressError(f"no quality metric among {sorted(metrics)}", f"the task must report one of {QUALITY_METRICS}")


def quality_range(task_name: str) -> tuple[float, float]:
    """The range of a task's quality metric (predictions are clipped to it): cosine fidelity for embeddings,
    a fraction otherwise."""
    return QUALITY_RANGES["fidelity_mean"] if task_name == "embedding" else QUALITY_RANGES["accuracy"]


def _param_axes(net: SuperNet) -> dict[str, tuple[int, list[tuple[str, int]]]]:
    """Per parameter: its element count and the searched groups that cut it (name, full size)."""
    from modelpress.search.supernet import searched_groups

    cuts: dict[str, list[tuple[str, int]]] = {}
    for gname in searched_groups(net.space):
        g = net.graph.group(gname)
        for param, _axis in g.slots:
            cuts.setdefault(param, []).append((g.name, g.size))
    return {name: (p.numel(), cuts.get(name, [])) for name, p in net.graph.module.named_parameters()}


def as_minimize(objectives: list[str], values: dict[str, float]) -> np.ndarray:
    """Objective values as a vector to minimize (quality negated)."""
    return np.array([-values[o] if OBJECTIVES[o] == "max" else values[o] for o in objectives], dtype=float)
