"""The latency model: a measured lookup table of per-block latency on a Target, interpolated.

Latency-aware pruning (NViT's ``I_S - eta * (Lat(W) - Lat(W without S))``, a latency target) and search
need the latency of many candidate architectures, each block with its own heads, head dim and MLP width,
some blocks removed. Measuring each is far too slow; predicting from a table is pure arithmetic
(microseconds). The model:

    latency(model) = rest(E) + sum over its blocks of block_ms(heads, head_dim, mlp, E) [+ conv part]

where E is the embedding (residual) width and ``rest`` is everything outside the blocks (embeddings,
pooler, head, session overhead). Widths are read from the graph's groups, block by block, so the model it
is built on may already be pruned (blocks of different widths, blocks removed): the grid's top is then its
widest block, and the table predicts that model and anything pruned from it. Conv channels (a CNN's conv
groups) have a measured part of their own, fitted per stage: :mod:`modelpress.bench.conv_latency`.

How the table is measured (``build_latency_table``), and why:

* **Blocks alone.** For every grid point, a one-block copy of the model is pruned with the graph's own
  edits (the last units of the head / head-dim / MLP groups of the block, the embedding groups
  everywhere), the block's inputs are captured by a forward pre-hook during one run of that copy, and the
  block is exported alone (its other inputs as constants) and timed with the interleaved runner. The block
  a point is cut from is the narrowest one at least as wide as the point (on an unpruned model, the first);
  every block's own widths are measured too, and points no block reaches (the widest heads and the widest
  MLP in different blocks) are left to the fit (their CV is recorded as -1). A block export
  takes a fraction of a second and times in a few milliseconds, so a 75-point MiniLM grid costs about a
  minute or two; timing whole models per grid point would cost six times the timing and far more export.
  Each point is kept as its ratio to the widest measured block of the same embedding width, the median
  of per-round ratios (both timed in the same round), which holds up far better than absolute times when
  the machine's load changes during the build. The ratios are fitted (non-negative least squares) by
  ``c0 + c1 heads x head_dim + c2 heads + c3 mlp``, 1 at the grid's top widths.
* **Calibrated by whole models.** Blocks alone are not blocks in a model (their weights stay in cache,
  each pays a session call). So per embedding width the model as given (n blocks), a one-block model
  (its first block) and a model with every block at about half its own heads and MLP width are timed in
  one interleaved run. A block of standalone ratio ``r`` takes ``level x (fixed + (1 - fixed) x r)`` in
  the model: ``L_n - L_1`` and ``L_n - L_half`` (medians over rounds), summed over the blocks' own
  ratios, give ``level`` (the in-model time of a block at the top widths) and the **fixed share** (what
  does not shrink with widths: kernel launches, norms, copies between ops; on MiniLM a block in the model
  took 1.5-2x its standalone time); ``rest`` puts the model as given at its measured latency. On a
  uniform model this is ``(L_n - L_1) / (n - 1)`` per block, as before. A single-block model uses its
  standalone time for the first equation. ``scale`` (in-model over standalone block) is recorded;
  ``notes`` say when it is more than 10% off 1. With the level alone (format 1), narrow blocks were
  predicted too fast and pruned MiniLMs' speedups over-predicted by 14-43%.
* **Interpolation.** Multilinear on the grid of fitted values (latency is close to linear in heads, MLP
  width and head dim at a fixed embedding width; multilinear interpolation is exact for products of linear terms such
  as heads x embedding), linear extrapolation from the end segments outside it, clamped at 0. ``heads=0``
  (attention gone) and ``mlp=0`` (MLP gone) extrapolate from the two smallest points.
* **No head-dim groups.** When the graph has no "head_dim" groups the head-dim axis holds the full width
  only; a block with another head dim is then looked up at ``heads * head_dim / full_head_dim`` heads
  (its projections and attention products scale with heads x head dim) and the table's notes say so.
* **Exports.** Plain ``torch.onnx`` exports (``optimize="none"``, HF models in eager attention); ONNX
  Runtime's own graph optimizations run in every session, as when the pipeline's export is measured.

A table is keyed by the architecture (model class, block type and count, widest widths, every block's
widths where they differ, conv groups' channels, vocabulary), the
target (name, providers, threads, session config), batch, sequence length, grid and export settings, and
records the versions and CPU that measured it; it is cached as JSON under ``$MODELPRESS_CACHE/latency``
and reused only when key and versions match. ``check`` refuses a graph or target it was not measured for.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.bench import conv_latency
from modelpress.bench.conv_latency import conv_groups, conv_widths
from modelpress.bench.runner import measure, torch_threads, write_json_atomic
from modelpress.errors import ModelpressError
from modelpress.export.onnx import attention_implementation, export_onnx
from modelpress.graph.inputs import InputSpec, primary_output
from modelpress.graph.model_graph import ModelGraph
from modelpress.graph.stats import block_widths, embedding_width, in_block
from modelpress.progress import QUIET, Reporter
from modelpress.system import load_average, system_info
from modelpress.targets import Target, get_target

AXES = ("heads", "head_dim", "mlp", "embed")
CLOCKS = ("wall", "cpu")
FORMAT = 3  # 3: optional conv part, grids fitted from non-uniform models; format 2 tables still load
EXPORT = {"exporter": "torch.onnx (dynamo=False)", "opset": 17, "optimize": "none", "attention": "eager"}

BlockSpec = tuple[float, float, float] | Mapping[str, Any]


# ------------------------------------------------------------------------------------------- table


@dataclass
class LatencyTable:
    """Measured per-block latency over a grid, plus the rest of the model; see the module docstring.

    ``block_ms_grid`` (in-model block ms), ``standalone_ms_grid`` (the standalone medians) and
    ``block_cv`` (coefficient of variation of the per-round ratios) are flat row-major lists over ``axes``
    in the order of ``AXES``; ``calibration`` holds, per embedding width (the order of ``axes["embed"]``),
    ``rest_ms``, ``block_in_model_ms``, ``scale`` and the whole-model timings they came from.
    """

    key: dict[str, Any]
    versions: dict[str, Any]
    axes: dict[str, list[int]]
    block_ms_grid: list[float]
    standalone_ms_grid: list[float]
    block_cv: list[float]
    calibration: list[dict[str, float]]
    notes: list[str] = field(default_factory=list)
    system: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    seconds: float = 0.0
    format: int = FORMAT
    conv: dict[str, Any] | None = None  # the conv part (modelpress.bench.conv_latency), when the model has conv groups

    def __post_init__(self) -> None:
        self.axes = {a: [int(v) for v in self.axes[a]] for a in AXES}
        sizes = [len(self.axes[a]) for a in AXES]
        if not math.prod(sizes) == len(self.block_ms_grid) == len(self.standalone_ms_grid) == len(self.block_cv):
            raise ModelpressError(
                f"latency table is inconsistent: {len(self.block_ms_grid)} block values for a "
                f"{'x'.join(map(str, sizes))} grid",
                "delete the cached table and build it again",
            )
        self._strides = [math.prod(sizes[i + 1 :]) for i in range(len(AXES))]
        self._rest = [float(c["rest_ms"]) for c in self.calibration]
        self._memo: dict[tuple, float] = {}  # block_ms by widths: search asks for the same ones again and again

    # ----- lookups -----
    @property
    def architecture(self) -> dict[str, Any]:
        return self.key["architecture"]

    def rest_ms(self, embed: float) -> float:
        """Latency outside the blocks at embedding width ``embed`` (interpolated, at least 0)."""
        return max(0.0, sum(w * self._rest[i] for i, w in _locate(self.axes["embed"], embed)))

    def _interpolate(self, heads: float, head_dim: float, mlp: float, embed: float) -> float:
        """The in-model block latency, multilinear on the grid (extrapolated linearly), unclamped."""
        locs = [
            _locate(self.axes["heads"], heads),
            _locate(self.axes["head_dim"], head_dim),
            _locate(self.axes["mlp"], mlp),
            _locate(self.axes["embed"], embed),
        ]
        grid, strides = self.block_ms_grid, self._strides
        total = 0.0
        for corner in itertools.product(*locs):
            weight = 1.0
            index = 0
            for (i, w), s in zip(corner, strides, strict=True):
                weight *= w
                index += i * s
            total += weight * grid[index]
        return total

    def block_ms(self, heads: float, head_dim: float, mlp: float, embed: float | None = None) -> float:
        """In-model latency of one block with these widths (``embed`` defaults to the full width).

        ``heads=0``: attention gone; ``mlp=0``: MLP gone. With a one-point head-dim axis, another head dim
        counts as ``heads * head_dim / full_head_dim`` heads.
        """
        embed = self.architecture["embed"] if embed is None else embed
        memo = (heads, head_dim, mlp, embed)
        value = self._memo.get(memo)
        if value is None:
            dims = self.axes["head_dim"]
            if len(dims) == 1 and head_dim and dims[0] and head_dim != dims[0]:
                heads, head_dim = heads * head_dim / dims[0], dims[0]
            value = self._memo[memo] = max(0.0, self._interpolate(heads, head_dim, mlp, embed))
            if len(self._memo) > 100_000:
                self._memo.clear()
        return value

    def predict_widths(self, blocks: Iterable[BlockSpec], embed: float | None = None,
                       convs: Mapping[str, float] | None = None) -> float:
        """Model latency (ms) for blocks given as (heads, head_dim, mlp) or dicts with those keys
        (missing heads / mlp count as 0: gone); removed blocks are simply not listed. ``convs``: conv group
        name -> channels (a group not listed has 0: its block is gone); None: the channels measured."""
        embed = self.architecture["embed"] if embed is None else embed
        total = self.rest_ms(embed) + self.conv_ms(convs)
        for b in blocks:
            if isinstance(b, Mapping):
                h, d, m = b.get("heads", 0), b.get("head_dim", self.architecture["head_dim"]), b.get("mlp", 0)
            else:
                h, d, m = b
            total += self.block_ms(h, d, m, embed)
        return total

    def conv_ms(self, convs: Mapping[str, float] | None = None) -> float:
        """What the conv channels add (ms): on a table of conv channels only, the model's latency; beside
        transformer blocks, the change from the channels measured (0 without conv groups or ``convs=None``)."""
        if self.conv is None:
            return 0.0
        if not _transformer(self.architecture):
            return conv_latency.predict_ms(self.conv, self.conv["groups"] if convs is None else convs)
        if convs is None:
            return 0.0
        return conv_latency.predict_ms(self.conv, convs) - conv_latency.predict_ms(self.conv, self.conv["groups"])

    def predict(self, graph: ModelGraph) -> float:
        """Predicted latency (ms) of ``graph`` from its current blocks' widths, embedding width and conv channels."""
        blocks, embed = graph_widths(graph)
        return self.predict_widths(blocks, embed, conv_widths(graph) if self.conv is not None else None)

    # ----- checks -----
    def check(self, graph: ModelGraph | None = None, target: Target | str | None = None,
              batch: int | None = None, seq: int | None = None) -> None:
        """Raise ModelpressError unless this table was measured for ``graph``'s architecture (the same
        model, possibly pruned), on ``target`` at ``batch`` and ``seq`` (arguments left None are not checked)."""
        k = self.key
        problems: list[str] = []
        if target is not None:
            t = get_target(target)
            want = _target_key(t)
            if want != k["target"]:
                problems.append(f"target {t.name} ({t.threads} threads)")
        if batch is not None and batch != k["batch"]:
            problems.append(f"batch {batch}")
        if seq is not None and k["seq"] is not None and seq != k["seq"]:
            problems.append(f"sequence {seq}")
        if graph is not None:
            problems += self._architecture_problems(graph)
        if problems:
            a, t = self.architecture, k["target"]
            raise ModelpressError(
                f"the latency table was measured for {a['model']} ({a['blocks']} x {a['block_type']}) on "
                f"{t['name']} ({t['threads']} threads), batch {k['batch']}, sequence {k['seq']}; "
                f"not for {', '.join(problems)}",
                "build a table for this model and target: modelpress bench --latency-table CKPT --target ...",
            )

    def _architecture_problems(self, graph: ModelGraph) -> list[str]:
        a = self.architecture
        model = _model_name(graph)
        if model != a["model"]:
            return [f"model {model}"]
        if graph.input_spec.kind == "text" and graph.input_spec.vocab_size != a["vocab"]:
            return [f"a {model} with vocabulary {graph.input_spec.vocab_size}"]
        blocks, embed = graph_widths(graph)
        types = {b.type for b in graph.blocks}
        if types and not types <= set(a["block_type"].split("+")):
            return [f"blocks {', '.join(sorted(types))}"]
        for name, size in conv_widths(graph).items() if "convs" in a else ():
            if size > a["convs"].get(name, 0):
                return [f"conv group {name} of {size} channels"]
        if len(blocks) > a["blocks"]:
            return [f"{len(blocks)} blocks"]
        if embed is not None and embed > a["embed"]:
            return [f"embedding width {embed}"]
        for b in blocks:
            if b.get("heads", 0) > a["heads"] or b.get("mlp", 0) > a["mlp"] or b.get("head_dim", 0) > a["head_dim"]:
                return [f"a block of {b.get('heads')} heads x {b.get('head_dim')}, MLP {b.get('mlp')}"]
        return []

    # ----- JSON -----
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "key": self.key,
            "versions": self.versions,
            "axes": self.axes,
            "block_ms": self.block_ms_grid,
            "standalone_ms": self.standalone_ms_grid,
            "block_cv": self.block_cv,
            "calibration": self.calibration,
            "notes": self.notes,
            "system": self.system,
            "created": self.created,
            "seconds": round(self.seconds, 2),
            "conv": self.conv,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyTable:
        if d.get("format") not in (2, FORMAT):
            raise ModelpressError(
                f"latency table format {d.get('format')!r} is not {FORMAT}", "build the table again"
            )
        try:
            return cls(
                key=d["key"], versions=d["versions"], axes=d["axes"], block_ms_grid=list(d["block_ms"]),
                standalone_ms_grid=list(d["standalone_ms"]),
                block_cv=list(d["block_cv"]), calibration=list(d["calibration"]), notes=list(d.get("notes", [])),
                system=d.get("system", {}), created=d.get("created", ""), seconds=float(d.get("seconds", 0.0)),
                format=int(d["format"]), conv=d.get("conv"),
            )
        except KeyError as exc:
            raise ModelpressError(f"latency table lacks {exc}", "build the table again") from None

    def save(self, path: os.PathLike | str) -> Path:
        """Write the table as JSON atomically (temporary file, then rename)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: os.PathLike | str) -> LatencyTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ModelpressError(f"cannot read latency table {path}: {exc}", "build the table again") from exc
        return cls.from_dict(data)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per grid point: the widths, standalone and in-model ms, CV."""
        out = []
        for idx, point in enumerate(itertools.product(*(self.axes[a] for a in AXES))):
            h, d, m, e = point
            out.append({
                "heads": h, "head_dim": d, "mlp": m, "embed": e,
                "standalone_ms": self.standalone_ms_grid[idx], "block_ms": self.block_ms_grid[idx],
                "cv": self.block_cv[idx],
            })
        return out

    def to_table(self):  # noqa: ANN201 - rich.table.Table
        """A rich table of the grid, the calibration in its caption."""
        from rich.table import Table

        k, a = self.key, self.architecture
        title = (f"block latency, {a['model']} ({a['blocks']} x {a['block_type']}) on {k['target']['name']}, "
                 f"{k['target']['threads']} threads, batch {k['batch']}, sequence {k['seq']}"
                 + (", process CPU time" if k.get("clock") == "cpu" else ""))
        table = Table(title=title)
        for col in ("embed", "heads", "head dim", "MLP", "block ms", "standalone ms", "CV %"):
            table.add_column(col, justify="right")
        for r in self.rows():
            table.add_row(str(r["embed"]), str(r["heads"]), str(r["head_dim"]), str(r["mlp"]),
                          f"{r['block_ms']:.3f}", f"{r['standalone_ms']:.3f}", f"{100 * r['cv']:.1f}")
        cal = "; ".join(
            f"embed {e}: rest {c['rest_ms']:.2f} ms, scale {c['scale']:.3f}, model {c['full_ms']:.2f} ms"
            for e, c in zip(self.axes["embed"], self.calibration, strict=True)
        )
        if self.conv is not None:
            cal += (f"; conv channels ({len(self.conv['groups'])} groups): model {self.conv['full_ms']:.2f} ms, "
                    f"fit residual {self.conv['residual']:.0%}")
        table.caption = cal + ("\n" + "\n".join(self.notes) if self.notes else "")
        return table


def _locate(axis: Sequence[int], x: float) -> list[tuple[int, float]]:
    """Grid indices and weights of ``x`` on a sorted axis (linear extrapolation past the ends)."""
    n = len(axis)
    if n == 1:
        return [(0, 1.0)]
    i = min(max(bisect.bisect_right(axis, x) - 1, 0), n - 2)
    t = (x - axis[i]) / (axis[i + 1] - axis[i])
    return [(i, 1.0 - t), (i + 1, t)]


# ------------------------------------------------------------------------------------- architecture


def _model_name(graph: ModelGraph) -> str:
    return str(graph.source.get("class") or type(graph.module).__name__)


def _block_groups(graph: ModelGraph, path: str, kind: str) -> list:
    return [g for g in graph.groups if g.kind == kind and in_block(g.scope, path)]


def graph_widths(graph: ModelGraph) -> tuple[list[dict[str, Any]], int | None]:
    """Per current block: heads, head_dim, mlp (0 when absent); and the embedding width. The graph's own
    widths (:func:`block_widths`, which prune's ``widths`` reads too): a block's head dim is the width its
    attention reshapes by, not a head-width group's size."""
    rows = [{k: int(r.get(k, 0)) for k in ("heads", "head_dim", "mlp")} for r in block_widths(graph)]
    return rows, embedding_width(graph)


def _architecture(graph: ModelGraph) -> dict[str, Any]:
    """What a table is measured for, read from the graph's groups: the block count and type, the widest
    block's widths (heads, head dim, MLP: the grid's top), the embedding width, and where the blocks differ
    (an already-pruned model) every block's widths as ``shapes``; the prunable conv groups' channels as
    ``convs``. A model with neither transformer blocks nor conv groups is refused (short error)."""
    blocks, embed = graph_widths(graph)
    transformer = any(b["heads"] or b["mlp"] for b in blocks)
    convs = conv_groups(graph)
    if not transformer and not convs:
        raise ModelpressError(
            f"{graph.name} has no attention heads, MLP units or conv channels (no prunable groups) to model",
            "a latency table predicts pruned widths; time the model itself with modelpress bench",
        )
    if transformer and embed is None:
        raise ModelpressError(f"{graph.name} has no embedding (residual) width", "latency tables model transformers")
    types = sorted({b.type for b in graph.blocks})
    heads = [g for g in graph.groups if g.kind == "head"]
    arch: dict[str, Any] = {
        "model": _model_name(graph),
        "block_type": "+".join(types) if types else "none",
        "blocks": len(blocks),
        "heads": max((b["heads"] for b in blocks), default=0) if transformer else 0,
        "head_dim": max((b["head_dim"] for b in blocks), default=0) if transformer else 0,
        "mlp": max((b["mlp"] for b in blocks), default=0) if transformer else 0,
        "embed": int(embed) if transformer else 0,
        "heads_per_unit": heads[0].heads_per_unit if heads else 1,
        "head_dim_groups": any(g.kind == "head_dim" for g in graph.groups),
        "vocab": graph.input_spec.vocab_size if graph.input_spec.kind == "text" else None,
        "input": graph.input_spec.kind,
    }
    shapes = [[b["heads"], b["head_dim"], b["mlp"]] for b in blocks]
    if transformer and any(s != shapes[0] for s in shapes):
        arch["shapes"] = shapes  # non-uniform (pruned): only then, so uniform models keep their cached tables
    if convs:
        arch["convs"] = convs
    return arch


def _transformer(arch: Mapping[str, Any]) -> bool:
    return bool(arch["heads"] or arch["mlp"])


def _shapes(arch: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """Every block's (heads, head dim, MLP) as measured (uniform tables: the widths, once per block)."""
    if "shapes" in arch:
        return [tuple(s) for s in arch["shapes"]]
    return [(arch["heads"], arch["head_dim"], arch["mlp"])] * arch["blocks"]


def _target_key(t: Target) -> dict[str, Any]:
    return {"name": t.name, "providers": list(t.providers), "threads": t.threads,
            "session_config": dict(t.session_config)}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def measurement_versions() -> dict[str, Any]:
    """What a table's numbers depend on besides its key: library versions and the CPU."""
    info = system_info()
    return {
        "onnxruntime": _version("onnxruntime"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "modelpress": _version("modelpress"),
        "cpu_model": info["cpu_model"],
        "cpu_flags": info["cpu_flags"],
    }


# ---------------------------------------------------------------------------------------------- grid


def default_grid(arch: Mapping[str, Any]) -> dict[str, list[int]]:
    """Heads at 1, 1/4, 1/2, 3/4 and all (in whole units), MLP at 1/8 ... all, embedding at 1/2, 3/4 and
    all, head dim at 1/2 and all when the graph has head-dim groups (else all only)."""
    q = max(1, int(arch["heads_per_unit"]))
    units = arch["heads"] // q
    heads = sorted({q * max(1, round(units * f)) for f in (0, 0.25, 0.5, 0.75, 1.0)}) if units else [0]
    mlp = sorted({max(1, round(arch["mlp"] * f)) for f in (0.125, 0.25, 0.5, 0.75, 1.0)}) if arch["mlp"] else [0]
    dims = [arch["head_dim"]]
    if arch["head_dim_groups"] and arch["head_dim"] >= 2:
        dims = sorted({arch["head_dim"] // 2, arch["head_dim"]})
    embed = sorted({max(1, round(arch["embed"] * f)) for f in (0.5, 0.75, 1.0)})
    return {"heads": heads, "head_dim": dims, "mlp": mlp, "embed": embed}


def parse_grid(text: str | None) -> dict[str, list[int]]:
    """``heads=1,6,12;mlp=384,1536`` (axes separated by ';' or spaces) into a partial grid."""
    out: dict[str, list[int]] = {}
    if not text:
        return out
    for part in text.replace(";", " ").split():
        name, sep, values = part.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in AXES:
            raise ModelpressError(f"bad grid entry {part!r}", f"write AXIS=V1,V2,... with AXIS one of {', '.join(AXES)}")
        try:
            out[name] = sorted({int(v) for v in values.split(",") if v.strip()})
        except ValueError:
            raise ModelpressError(f"bad grid values in {part!r}", "use whole numbers, e.g. heads=3,6,12") from None
        if not out[name]:
            raise ModelpressError(f"grid axis {name} has no values", "e.g. heads=3,6,12")
    return out


def _resolve_grid(arch: Mapping[str, Any], grid: Mapping[str, Sequence[int]] | str | None) -> dict[str, list[int]]:
    given = parse_grid(grid) if isinstance(grid, str) else {k: sorted({int(v) for v in vs}) for k, vs in (grid or {}).items()}
    if not _transformer(arch):  # conv channels only: a one-point grid of nothing (the conv part holds the model)
        if given:
            raise ModelpressError(f"{arch['model']} has no transformer blocks for a grid", "leave --grid out")
        return {a: [0] for a in AXES}
    axes = default_grid(arch)
    for name, values in given.items():
        if name not in AXES:
            raise ModelpressError(f"unknown grid axis {name!r}", f"use {', '.join(AXES)}")
        axes[name] = values
    for name in AXES:
        full = arch[name]
        values = sorted(set(axes[name]) | {full})
        if name == "head_dim" and not arch["head_dim_groups"] and values != [full]:
            raise ModelpressError(
                f"this model has no head-dim groups, so the head-dim axis can only be {full}",
                "leave head_dim out of --grid",
            )
        bad = [v for v in values if v > full or (v < 1 and full > 0)]
        if bad:
            raise ModelpressError(f"grid axis {name}: {bad} outside 1..{full}", f"use values between 1 and {full}")
        if name == "heads" and any(v % arch["heads_per_unit"] for v in values):
            raise ModelpressError(f"grid heads {values}: heads come in units of {arch['heads_per_unit']}")
        axes[name] = values
    return axes


# ------------------------------------------------------------------------------------------ variants


def _keep_last(graph: ModelGraph, groups: list, fraction: float, force: bool = False) -> None:
    """Remove the last units of ``groups`` so each keeps ``fraction`` of its units (at least one)."""
    plan = []
    for g in groups:
        keep = max(1, int(round(g.size * fraction)))
        if keep < g.size:
            plan.append((g.name, list(range(keep, g.size))))
    if plan:
        graph.remove_many(plan, force=force)


def _with_embed(graph: ModelGraph, arch: Mapping[str, Any], embed: int) -> ModelGraph:
    out = graph.copy()
    if embed != arch["embed"]:
        groups = [g for g in out.groups_of_kind("embedding", prunable_only=False) if not g.meta.get("fixed")]
        if not groups:
            raise ModelpressError(f"{graph.name}'s embedding width cannot be edited", "leave embed out of --grid")
        _keep_last(out, groups, embed / arch["embed"], force=True)
    return out


def _block_variant(graph: ModelGraph, source: Sequence[int], heads: int, head_dim: int, mlp: int) -> ModelGraph:
    """A copy whose first block (of widths ``source`` = heads, head dim, MLP) is cut to these widths."""
    out = graph.copy()
    path = out.blocks[0].path
    h0, d0, m0 = source
    if heads != h0:
        _keep_last(out, _block_groups(out, path, "head"), heads / h0)
    if head_dim != d0:
        _keep_last(out, _block_groups(out, path, "head_dim"), head_dim / d0)
    if mlp != m0:
        _keep_last(out, _block_groups(out, path, "mlp"), mlp / m0)
    return out


class _Standalone(nn.Module):
    """One block called on its hidden states, its other captured inputs held as constants."""

    def __init__(self, block: nn.Module, args: tuple, kwargs: dict, position: str | int) -> None:
        super().__init__()
        self.block = block
        self.args, self.kwargs, self.position = args, kwargs, position

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = list(self.args), dict(self.kwargs)
        if isinstance(self.position, int):
            args[self.position] = hidden
        else:
            kwargs[self.position] = hidden
        return primary_output(self.block(*args, **kwargs))


def _capture(graph: ModelGraph, path: str, seq: int | None) -> tuple[tuple, dict, str | int, torch.Tensor]:
    """The inputs of block ``path`` during one batch-1 run (eager attention must already be on)."""
    block = graph.module.get_submodule(path)
    seen: dict[str, Any] = {}

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if "args" not in seen:
            seen["args"], seen["kwargs"] = args, kwargs

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        graph.forward(graph.example_inputs(1, seq))
    finally:
        handle.remove()
    args, kwargs = seen["args"], seen["kwargs"]
    if args and isinstance(args[0], torch.Tensor):
        position: str | int = 0
        hidden = args[0]
    else:
        position = "hidden_states" if "hidden_states" in kwargs else next(
            k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        hidden = kwargs[position]
    return tuple(args), dict(kwargs), position, hidden.detach()


def _export_block(graph: ModelGraph, seq: int | None, path: Path) -> InputSpec:
    """Export ``graph``'s first block alone to ``path``; returns its input spec."""
    block_path = graph.blocks[0].path
    with attention_implementation(graph.module, "eager"):
        args, kwargs, position, hidden = _capture(graph, block_path, seq)
        spec = InputSpec("tensor", ["hidden_states"], shape=tuple(hidden.shape[1:]))
        wrapper = _Standalone(graph.module.get_submodule(block_path), args, kwargs, position).eval()
        export_onnx(wrapper, spec, path, optimize="none", verify=True, attn_implementation=None)
    return spec


def _half_blocks(graph: ModelGraph) -> ModelGraph:
    """A copy with every block at about half its own heads and MLP width (the calibration's second level)."""
    out = graph.copy()
    for b in out.blocks:
        _keep_last(out, _block_groups(out, b.path, "head"), 0.5)
        _keep_last(out, _block_groups(out, b.path, "mlp"), 0.5)
    return out


def _one_block(graph: ModelGraph, keep: int = 0) -> ModelGraph:
    """A copy with only block ``keep`` (it becomes the first block)."""
    out = graph.copy()
    out.remove_blocks([b.path for i, b in enumerate(out.blocks) if i != keep])
    return out


def _sources(arch: Mapping[str, Any], axes: Mapping[str, list[int]]) -> dict[tuple[int, int, int], int]:
    """Which block each standalone point is cut from: every grid point (heads, head dim, MLP) some block is at
    least as wide as (the narrowest such block: the least cut), and every block's own widths. Grid points no
    block reaches (a pruned model whose widest heads and widest MLP are in different blocks) are not measured:
    the fit over the measured points gives them."""
    shapes = _shapes(arch)
    out: dict[tuple[int, int, int], int] = {}
    for p in itertools.product(axes["heads"], axes["head_dim"], axes["mlp"]):
        fits = [i for i, s in enumerate(shapes) if all(a <= b for a, b in zip(p, s, strict=True))]
        if fits:
            out[p] = min(fits, key=lambda i: (_work(*shapes[i]), i))
    for i, s in enumerate(shapes):
        if (s[0] or s[2]) and s not in out:
            out[s] = i
    return out


# ------------------------------------------------------------------------------------------ building


def latency_cache_dir(cache_dir: os.PathLike | str | None = None) -> Path:
    """``cache_dir`` if given, else ``$MODELPRESS_CACHE/latency``, else ``~/.cache/modelpress/latency``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("MODELPRESS_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "modelpress") / "latency"


def table_key(graph: ModelGraph, target: Target | str = "ort-cpu", *, batch: int = 1, seq: int | None = None,
              grid: Mapping[str, Sequence[int]] | str | None = None, clock: str = "wall") -> dict[str, Any]:
    """The cache key of the table ``build_latency_table`` would measure with these arguments."""
    t = get_target(target)
    _check_clock(clock, t)
    arch = _architecture(graph)
    if graph.input_spec.kind == "text":
        seq = graph.input_spec.fit_seq_len(seq or t.seq_lens[0])
    else:
        seq = None
    return {"architecture": arch, "target": _target_key(t), "batch": int(batch), "seq": seq,
            "axes": _resolve_grid(arch, grid), "export": dict(EXPORT), "clock": clock}


def _check_clock(clock: str, target: Target) -> None:
    if clock not in CLOCKS:
        raise ModelpressError(f"unknown clock {clock!r}", f"use one of: {', '.join(CLOCKS)}")
    if clock == "cpu" and target.threads != 1:
        raise ModelpressError(
            f"the cpu clock needs 1 thread (target {target.name} has {target.threads})",
            "process CPU time counts ONNX Runtime's spinning threads; use --threads 1 or the wall clock",
        )


def cache_path(key: Mapping[str, Any], cache_dir: os.PathLike | str | None = None) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return latency_cache_dir(cache_dir) / f"{key['architecture']['model']}-{digest}.json"


def build_latency_table(
    graph: ModelGraph,
    target: Target | str = "ort-cpu",
    *,
    batch: int = 1,
    seq: int | None = None,
    grid: Mapping[str, Sequence[int]] | str | None = None,
    rounds: int = 3,
    runs: int = 10,
    min_time_s: float = 0.1,
    model_rounds: int = 5,
    clock: str = "wall",
    cache: bool = True,
    refresh: bool = False,
    cache_dir: os.PathLike | str | None = None,
    reporter: Reporter = QUIET,
) -> LatencyTable:
    """Measure (or load from the cache) the latency table of ``graph``'s architecture on ``target``.

    ``grid`` overrides axes of ``default_grid`` (a dict or ``"heads=1,6,12;mlp=384,1536"``); the full
    widths are always on it. Blocks are timed ``rounds`` interleaved rounds of at least ``runs`` runs and
    ``min_time_s`` seconds; the calibration models ``model_rounds`` rounds. ``cache``: read and write
    ``$MODELPRESS_CACHE/latency`` (``refresh``: measure again and overwrite). ``clock="cpu"`` (1 thread
    only) uses process CPU time per run instead of wall time: steadier on a busy machine, so tests use
    it; a wall-clock table is what a target's latency means. See the module docstring.
    """
    if batch < 1:
        raise ModelpressError(f"batch must be at least 1, got {batch}")
    t = get_target(target)
    key = table_key(graph, t, batch=batch, seq=seq, grid=grid, clock=clock)
    versions = measurement_versions()
    path = cache_path(key, cache_dir)
    if cache and not refresh and path.is_file():
        try:
            cached = LatencyTable.load(path)
        except ModelpressError:
            cached = None
        if cached is not None and cached.key == key and cached.versions == versions:
            reporter.log(f"latency table from the cache: {path}")
            return cached
        if cached is not None:
            reporter.log("the cached latency table was measured with other versions: measuring again")
    table = _measure_table(graph, t, key, versions, rounds, runs, min_time_s, model_rounds, reporter)
    if cache:
        table.save(path)
        reporter.log(f"wrote latency table {path}")
    return table


def _measure_table(
    graph: ModelGraph, target: Target, key: dict[str, Any], versions: dict[str, Any], rounds: int, runs: int,
    min_time_s: float, model_rounds: int, reporter: Reporter,
) -> LatencyTable:
    """Export every standalone block and the whole-model references, time them, fit and calibrate; and the
    conv channel variants when the model has conv groups."""
    started = time.perf_counter()
    load_before = load_average()
    target.require_available()
    arch, axes = key["architecture"], key["axes"]
    notes: list[str] = []
    transformer = _transformer(arch)
    if transformer and not arch["head_dim_groups"]:
        notes.append(f"no head-dim groups: the head-dim axis is {arch['head_dim']} only; other head dims are "
                     "looked up as heads x head dim / full head dim heads")
    if "shapes" in arch:
        notes.append(f"blocks of different widths {sorted({tuple(s) for s in arch['shapes']})}: standalone points "
                     "cut from the narrowest block that reaches them")
    timing = {"rounds": rounds, "runs": runs, "min_time_s": min_time_s, "model_rounds": model_rounds}
    conv = None
    tmp = Path(tempfile.mkdtemp(prefix="modelpress-latency-"))
    try:
        if transformer:
            files = _export_table_models(graph, arch, axes, key["seq"], tmp, reporter)
            medians, ratios = _time_blocks(files, target, key, timing, reporter)
            model_rounds_ms = _time_models(files.models, graph.input_spec, target, key, timing, reporter)
        if "convs" in arch:
            conv = _measure_convs(graph, arch, target, key, timing, tmp, reporter, notes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if transformer:
        fits, ref_ms, fit_notes = _fit_ratios(axes, arch, files.points, ratios, medians)
        notes += fit_notes
        calibration = [_calibrate(e, arch, files, fits[e], ref_ms[e], model_rounds_ms, notes) for e in axes["embed"]]
        grid, standalone, cvs, unmeasured = [], [], [], 0
        for h, d, m, e in itertools.product(*(axes[a] for a in AXES)):
            c = calibration[axes["embed"].index(e)]
            r = _ratio(fits[e], arch, h, d, m)
            grid.append(c["block_in_model_ms"] * (c["fixed_share"] + (1.0 - c["fixed_share"]) * r))
            nm = _point_name(e, h, d, m)
            if nm in medians:
                standalone.append(medians[nm])
                cvs.append(_cv(ratios[nm]))
            else:
                standalone.append(ref_ms[e] * r)
                cvs.append(-1.0)
                unmeasured += 1
        if unmeasured:
            notes.append(f"{unmeasured} grid points are wider than every block: fitted, not measured (CV -1)")
    else:
        calibration = [{"embed": 0, "rest_ms": 0.0, "block_in_model_ms": 0.0, "scale": 1.0, "fixed_share": 0.0,
                        "full_ms": conv["full_ms"], "one_block_ms": 0.0, "block_standalone_ms": 0.0}]
        grid, standalone, cvs = [0.0], [0.0], [0.0]
    system = system_info(target.threads)
    system["load_average_1min"] = [load_before, load_average()]
    return LatencyTable(
        key=key, versions=versions, axes=axes, block_ms_grid=grid, standalone_ms_grid=standalone, block_cv=cvs,
        calibration=calibration, notes=notes, system=system, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        seconds=time.perf_counter() - started, conv=conv,
    )


@dataclass
class _TableFiles:
    """The ONNX files a table is measured on: per embedding width, one file per standalone block (and the
    input spec they share), the whole-model references (full, one block, every block at about half its
    widths) with their blocks' widths, and each standalone point's (heads, head dim, MLP)."""

    blocks: dict[int, dict[str, Path]] = field(default_factory=dict)
    block_specs: dict[int, InputSpec] = field(default_factory=dict)
    models: dict[str, Path] = field(default_factory=dict)
    widths: dict[str, list[dict[str, int]]] = field(default_factory=dict)
    points: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def _export_table_models(
    graph: ModelGraph, arch: Mapping[str, Any], axes: Mapping[str, list[int]], seq: int | None, tmp: Path,
    reporter: Reporter,
) -> _TableFiles:
    """Export the whole-model references and every standalone point's block, per embedding width."""
    files = _TableFiles()
    n = arch["blocks"]
    shapes = _shapes(arch)
    sources = _sources(arch, axes)
    by_source: dict[int, list[tuple[int, int, int]]] = {}
    for point, src in sorted(sources.items()):
        by_source.setdefault(src, []).append(point)
    # one torch thread while exporting: on a busy machine torch's spinning threads stall each other
    with torch_threads(1):
        for e in axes["embed"]:
            with reporter.step(f"exporting the whole model and a one-block model at embedding {e}"):
                base = _with_embed(graph, arch, e)
                _reference(files, f"full_e{e}", base, tmp)
                if n > 1:
                    _reference(files, f"one_e{e}", _one_block(base, 0), tmp)
                mid = _half_blocks(base)
                if graph_widths(mid)[0] != files.widths[f"full_e{e}"]:  # the calibration's second level
                    _reference(files, f"mid_e{e}", mid, tmp)
                del mid
            blocks: dict[str, Path] = {}
            points = [(src, p) for src, ps in by_source.items() for p in ps]
            one, one_src = None, None
            for src, (h, d, m) in reporter.track(points, f"exporting {len(points)} blocks at embedding {e}"):
                if src != one_src:  # block variants are cut from a one-block model: smaller copies, faster runs
                    one, one_src = (_one_block(base, src) if n > 1 else base), src
                name = _point_name(e, h, d, m)
                files.block_specs[e] = _export_block(_block_variant(one, shapes[src], h, d, m), seq, tmp / f"{name}.onnx")
                blocks[name] = tmp / f"{name}.onnx"
                files.points[name] = (h, d, m)
            files.blocks[e] = blocks
            del base, one
    return files


def _reference(files: _TableFiles, name: str, graph: ModelGraph, tmp: Path) -> None:
    files.models[name] = _export_plain(graph, tmp / f"{name}.onnx")
    files.widths[name] = graph_widths(graph)[0]


def _export_plain(graph: ModelGraph, path: Path) -> Path:
    return Path(export_onnx(graph.module, graph.input_spec, path, optimize="none").path)


def _time_blocks(
    files: _TableFiles, target: Target, key: Mapping[str, Any], timing: Mapping[str, Any], reporter: Reporter,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each block's median latency and its per-round ratios to the widest block of its embedding width."""
    batch = key["batch"]
    medians: dict[str, float] = {}
    ratios: dict[str, list[float]] = {}
    for e, blocks in files.blocks.items():
        widest = max(blocks, key=lambda nm: _work(*files.points[nm]))
        report = measure(blocks, files.block_specs[e], target, rounds=timing["rounds"], runs=timing["runs"],
                         min_time_s=timing["min_time_s"], warmup=3, batch_sizes=[batch], memory=False,
                         baseline=widest, reporter=reporter)
        base_cpu = report.stats(widest, batch).cpu_ms or 0.0
        for name in blocks:
            s = report.stats(name, batch)
            if key["clock"] == "cpu":
                medians[name], ratios[name] = s.cpu_ms or 0.0, [(s.cpu_ms or 0.0) / base_cpu]
            else:
                medians[name], ratios[name] = s.median_ms, [1.0 / r for r in s.speedup_rounds if r > 0]
    return medians, ratios


def _work(h: int, d: int, m: int) -> tuple[int, int]:
    """A block's size order: its attention and MLP weights per embedding channel (4 h d + 2 m)."""
    return 4 * h * d + 2 * m, h


def _time_models(
    models: Mapping[str, Path], input_spec: InputSpec, target: Target, key: Mapping[str, Any],
    timing: Mapping[str, Any], reporter: Reporter,
) -> dict[str, list[float]]:
    """The whole-model references' per-round medians (CPU time: one value)."""
    batch, seq = key["batch"], key["seq"]
    report = measure(dict(models), input_spec, target, rounds=timing["model_rounds"], runs=timing["runs"],
                     min_time_s=max(timing["min_time_s"], 0.2), warmup=3, batch_sizes=[batch],
                     seq_lens=[seq] if seq else None, memory=False, reporter=reporter)
    return {
        name: [report.stats(name, batch).cpu_ms or 0.0] if key["clock"] == "cpu"
        else report.stats(name, batch).round_medians_ms
        for name in models
    }


def _calibrate(
    e: int, arch: Mapping[str, Any], files: _TableFiles, fit: Sequence[float], ref_ms: float,
    model_rounds_ms: Mapping[str, list[float]], notes: list[str],
) -> dict[str, Any]:
    """How the blocks at embedding ``e`` sit in the whole model. A block of standalone ratio ``r`` (its fitted
    standalone latency over that of a block at the table's top widths) takes ``level x (fixed + (1 - fixed) r)``
    in the model. Per block: the full model minus the one-block model (blocks 1..n-1) and the full model minus
    the model with every block at about half its widths give two equations in ``level x fixed`` and
    ``level x (1 - fixed)``; with one block, its standalone time stands in for the first. ``fixed`` (the
    share that does not shrink with widths: launches, norms, copies between ops) is kept in [0, 0.95] and
    the level then set by the first equation; ``rest`` puts the full model at its measured latency.
    Appends what looked off to ``notes``."""
    n = arch["blocks"]

    def ratios(name: str) -> list[float]:
        return [_ratio(fit, arch, b["heads"], b["head_dim"], b["mlp"]) for b in files.widths[name]]

    full_r = np.asarray(model_rounds_ms[f"full_e{e}"])
    r_full = ratios(f"full_e{e}")
    big_r = sum(r_full)
    r0 = r_full[0]
    alone = ref_ms * r0  # block 0 alone (fitted)
    if n > 1:
        one_r = np.asarray(model_rounds_ms[f"one_e{e}"])
        d1, a1, b1 = float(np.median(full_r - one_r)), n - 1.0, big_r - r0
        one = float(np.median(one_r))
    else:
        d1, a1, b1 = alone, 1.0, r0
        one = float(np.median(full_r))
    fixed = 0.0
    mid = f"mid_e{e}" in model_rounds_ms
    if mid:
        d2 = float(np.median(full_r - np.asarray(model_rounds_ms[f"mid_e{e}"])))
        span = big_r - sum(ratios(f"mid_e{e}"))
        if span > 1e-6 and d2 > 0:
            b = d2 / span  # level x (1 - fixed)
            a = max(d1 - b * b1, 0.0) / a1  # level x fixed
            fixed = float(np.clip(a / (a + b), 0.0, 0.95)) if a + b > 0 else 0.0
    level = d1 / (a1 * fixed + b1 * (1.0 - fixed)) if a1 * fixed + b1 * (1.0 - fixed) > 0 else 0.0
    if not np.isfinite(level) or level <= 0:
        notes.append(f"embedding {e}: the whole model was not slower than one block (too noisy); "
                     "blocks kept at their standalone latency")
        level, fixed = ref_ms, 0.0
    rest = float(np.median(full_r)) - level * (n * fixed + (1.0 - fixed) * big_r)
    if rest < 0:
        notes.append(f"embedding {e}: rest came out {rest:.2f} ms (noise), set to 0")
        rest = 0.0
    scale = level / ref_ms if ref_ms > 0 else 1.0
    if abs(scale - 1.0) > 0.10:
        notes.append(f"embedding {e}: a block in the model takes {scale:.2f}x its standalone time")
    if fixed > 0.05:
        notes.append(f"embedding {e}: {fixed:.0%} of a block's in-model time does not shrink with its widths")
    return {"embed": e, "rest_ms": rest, "block_in_model_ms": level, "scale": scale, "fixed_share": fixed,
            "full_ms": float(np.median(full_r)), "one_block_ms": one, "block_standalone_ms": ref_ms,
            "fit": [float(c) for c in fit],
            **({"mid_ms": float(np.median(model_rounds_ms[f"mid_e{e}"]))} if mid else {})}


def _features(arch: Mapping[str, Any], h: float, d: float, m: float) -> list[float]:
    heads, dim, mlp = max(arch["heads"], 1), max(arch["head_dim"], 1), max(arch["mlp"], 1)
    return [1.0, h * d / (heads * dim), h / heads, m / mlp]


def _ratio(fit: Sequence[float], arch: Mapping[str, Any], h: float, d: float, m: float) -> float:
    """A block's fitted standalone latency over that of a block at the table's top widths."""
    return float(np.dot(fit, _features(arch, h, d, m)))


def _fit_ratios(
    axes: Mapping[str, list[int]], arch: Mapping[str, Any], points: Mapping[str, tuple[int, int, int]],
    ratios: Mapping[str, list[float]], medians: Mapping[str, float],
) -> tuple[dict[int, list[float]], dict[int, float], list[str]]:
    """Per embedding width, a block's standalone latency as a non-negative sum of the terms its work scales
    with: ``c0 + c1 (heads x head_dim) + c2 heads + c3 mlp`` (projections and attention products, softmax
    over heads, the MLP; widths over the table's top widths), fitted to the measured points' median ratios
    (to the widest measured block) by non-negative least squares weighted by each point's steadiness, and
    scaled to 1 at the top widths. Returns the coefficients and the standalone ms at the top widths per
    embedding width, and notes.

    Timing a few-millisecond block is noisy on a shared machine (per-point spreads of 20-80% on 2 busy
    cores); the fit keeps the table monotone in every width and averages the noise over all points instead
    of trusting each one; it also gives the points no block of a pruned model reaches. The fit's residual
    is reported in the notes."""
    from scipy.optimize import nnls

    fits: dict[int, list[float]] = {}
    ref_ms: dict[int, float] = {}
    notes: list[str] = []
    for e in axes["embed"]:
        rows, ys, ws, base = [], [], [], None
        for nm, (h, d, m) in points.items():
            if not nm.startswith(f"e{e}_"):
                continue
            values = [v for v in ratios[nm] if np.isfinite(v)]
            if not values:
                continue
            if base is None or _work(h, d, m) > _work(*points[base]):
                base = nm
            rows.append(_features(arch, h, d, m))
            ys.append(float(np.median(values)))
            ws.append(1.0 / (0.05 + _cv(values)))
        x, y, w = np.asarray(rows), np.asarray(ys), np.asarray(ws)
        coef, _ = nnls(x * w[:, None], y * w)
        top = float(coef.sum())
        if top <= 0:  # nothing to fit (all zero): latency in proportion to the block's weights
            coef, top = np.asarray([0.0, 2.0, 0.0, 1.0]) / 3.0, 1.0
            notes.append(f"embedding {e}: no block timing to fit; blocks scaled by their weights")
        fits[e] = (coef / top).tolist()
        ref_ms[e] = float(medians[base] * top) if base is not None else 0.0
        rms = float(np.sqrt(np.mean((x @ coef - y) ** 2)))
        if rms > 0.1:
            notes.append(f"embedding {e}: block ratios fitted with an rms residual of {rms:.2f} (noisy timings)")
    return fits, ref_ms, notes


def _measure_convs(
    graph: ModelGraph, arch: Mapping[str, Any], target: Target, key: Mapping[str, Any], timing: Mapping[str, Any],
    tmp: Path, reporter: Reporter, notes: list[str],
) -> dict[str, Any]:
    """The conv part (:mod:`modelpress.bench.conv_latency`): whole models with each conv group cut, timed
    interleaved against the model as given (per-round ratios), fitted per stage."""
    full = dict(arch["convs"])
    batch, seq = key["batch"], key["seq"]
    stages = conv_latency.conv_stages(graph, batch)
    with torch_threads(1), reporter.step(f"exporting conv channel variants of {len(full)} groups"):
        files = conv_latency.export_variants(graph, full, tmp, _export_plain)
    report = measure({k: v[0] for k, v in files.items()}, graph.input_spec, target, rounds=timing["model_rounds"],
                     runs=timing["runs"], min_time_s=max(timing["min_time_s"], 0.1), warmup=3, batch_sizes=[batch],
                     seq_lens=[seq] if seq else None, memory=False, baseline="full", reporter=reporter)
    cpu = key["clock"] == "cpu"
    full_ms = (report.stats("full", batch).cpu_ms or 0.0) if cpu else report.stats("full", batch).median_ms
    ms: dict[str, float] = {}
    for name in files:
        s = report.stats(name, batch)
        if cpu:
            ms[name] = s.cpu_ms or 0.0
        elif name == "full":
            ms[name] = full_ms
        else:
            ratios = [1.0 / r for r in s.speedup_rounds if r > 0]
            ms[name] = full_ms * float(np.median(ratios)) if ratios else float("nan")
    settings = {k: v[1] for k, v in files.items()}
    coef, rms = conv_latency.fit(stages, full, settings, ms)
    if rms > 0.1:
        notes.append(f"conv channels fitted with a relative rms residual of {rms:.2f} (noisy timings)")
    zero = [g for i, g in enumerate(full) if coef[1 + i] <= 0 and coef[1 + len(full) + i] <= 0]
    if zero:
        notes.append(f"conv groups measured as free (within the noise): {', '.join(zero)}")
    return {"groups": full, "stages": stages, "coef": coef, "full_ms": full_ms, "residual": rms,
            "variants": {n: {"channels": settings[n], "ms": ms[n]} for n in files}}


def _point_name(e: int, h: int, d: int, m: int) -> str:
    return f"e{e}_h{h}_d{d}_m{m}"


def _cv(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(arr.std() / arr.mean()) if len(arr) > 1 and arr.mean() > 0 else 0.0


# ----------------------------------------------------------------------------------------- checking


def compare_latency(
    table: LatencyTable,
    graphs: Mapping[str, ModelGraph],
    target: Target | str = "ort-cpu",
    *,
    rounds: int = 5,
    runs: int = 10,
    min_time_s: float = 0.3,
    reporter: Reporter = QUIET,
) -> list[dict[str, Any]]:
    """Predicted against measured latency for ``graphs`` (the first is the baseline), timed interleaved.

    Per graph: predicted and measured ms, and the speedups over the baseline (measured: the median of
    per-round ratios; on a cpu-clock table, process CPU time per run); ``speedup_error`` is predicted /
    measured speedup - 1.
    """
    if not graphs:
        raise ModelpressError("nothing to compare: no graphs given")
    t = get_target(target)
    batch, seq = table.key["batch"], table.key["seq"]
    for g in graphs.values():
        table.check(g, t, batch, seq)
    predicted = {name: table.predict(g) for name, g in graphs.items()}
    first = next(iter(graphs.values()))
    tmp = Path(tempfile.mkdtemp(prefix="modelpress-latency-check-"))
    try:
        files = {}
        for name, g in reporter.track(list(graphs.items()), "exporting"):
            files[name] = export_onnx(g.module, g.input_spec, tmp / f"{len(files)}.onnx", optimize="none").path
        report = measure(files, first.input_spec, t, rounds=rounds, runs=runs, min_time_s=min_time_s,
                         warmup=3, batch_sizes=[batch], seq_lens=[seq] if seq else None, memory=False,
                         reporter=reporter)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = next(iter(graphs))
    rows = []
    cpu = table.key.get("clock") == "cpu"
    for name in graphs:
        s = report.stats(name, batch)
        measured = (s.cpu_ms or 0.0) if cpu else s.median_ms
        speedup = (report.stats(base, batch).cpu_ms or 0.0) / measured if cpu and measured else s.speedup
        p_speed = predicted[base] / predicted[name]
        rows.append({
            "name": name, "predicted_ms": predicted[name], "measured_ms": measured,
            "predicted_speedup": p_speed, "measured_speedup": speedup,
            "speedup_error": p_speed / speedup - 1.0 if speedup else None,
        })
    return rows
