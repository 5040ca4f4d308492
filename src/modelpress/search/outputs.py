"""Outputs of a search: the Pareto set as CSV and JSON (config, objectives measured and predicted), the
hypervolume, a Pareto plot with the baselines, and extraction of a chosen point as a standalone model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.bench.runner import write_json_atomic
from modelpress.errors import ModelpressError
from modelpress.search.linas import Problem, hypervolume, pareto_mask
from modelpress.search.workers import load_evaluator


def reference_point(points: np.ndarray) -> np.ndarray:
    """A hypervolume reference point: 10% beyond the worst of ``points`` on each (minimized) objective."""
    worst, best = points.max(axis=0), points.min(axis=0)
    return worst + 0.1 * np.maximum(worst - best, 1e-9)


def write_outputs(run: Path, state: dict[str, Any], baselines: dict[str, Any], problem: Problem) -> dict[str, Any]:
    """pareto.json (the summary returned), pareto.csv and pareto.png of a finished (or stopped) search."""
    records = state["records"]
    objs = problem.objectives
    pts = np.array([problem.vector(r["objectives"]) for r in records])
    base = {n: problem.vector(p["objectives"]) for n, p in baselines.get("points", {}).items()}
    mask = pareto_mask(pts)
    front = [(i, records[i]) for i in np.flatnonzero(mask)]
    front.sort(key=lambda ir: problem.vector(ir[1]["objectives"])[0])
    ref = reference_point(np.vstack([pts, *base.values()]) if base else pts)
    uniform = np.array([v for n, v in base.items() if n.startswith(("uniform", "full"))])
    summary = {
        "objectives": objs,
        "evaluated": len(records),
        "batches": state["batches"],
        "hypervolume": hypervolume(pts[mask], ref),
        "hypervolume_uniform_baselines": hypervolume(uniform[pareto_mask(uniform)], ref) if len(uniform) else None,
        "reference_point": ref.tolist(),
        "baselines": baselines,
        "pareto": [
            {"point": k, "record": int(i), "config": r["config"], "objectives": r["objectives"],
             "predicted": r["predicted"], "batch": r["batch"]}
            for k, (i, r) in enumerate(front)
        ],
    }
    write_json_atomic(run / "pareto.json", summary)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["point", *objs, *[f"predicted_{o}" for o in objs if o not in problem.cheap_objectives], "config"])
    for row in summary["pareto"]:
        pred = row["predicted"] or {}
        w.writerow([row["point"], *[row["objectives"][o] for o in objs],
                    *[pred.get(o, "") for o in objs if o not in problem.cheap_objectives],
                    json.dumps(row["config"], sort_keys=True)])
    tmp = run / ".pareto.csv.tmp"
    tmp.write_text(buf.getvalue())
    tmp.replace(run / "pareto.csv")
    summary["plot"] = plot(run, summary, records)
    return summary


def plot(run: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> str | None:
    """pareto.png: quality (or the first objective) against latency (or the second), every measured
    candidate, the front, and the baselines. None when matplotlib (extra ``plot``) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    objs = summary["objectives"]
    x_o = "latency" if "latency" in objs else objs[1]
    y_o = "quality" if "quality" in objs else objs[0]
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ax.scatter([r["objectives"][x_o] for r in records], [r["objectives"][y_o] for r in records], s=12,
               c="0.7", label="measured")
    front = summary["pareto"]
    ax.plot([p["objectives"][x_o] for p in front], [p["objectives"][y_o] for p in front], "o-", c="C0",
            ms=4, label="Pareto front")
    for k, (name, p) in enumerate(summary["baselines"].get("points", {}).items()):
        ax.scatter([p["objectives"][x_o]], [p["objectives"][y_o]], marker="*s^vD"[k % 5], s=60, c=f"C{k + 1}",
                   label=name)
    ax.set_xlabel(x_o + (" (ms)" if x_o == "latency" else " (MB)" if x_o == "size" else ""))
    ax.set_ylabel(y_o)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = run / ".pareto.png.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(run / "pareto.png")
    return str(run / "pareto.png")


def choose(summary: dict[str, Any], *, point: int | None = None, max_latency: float | None = None,
           min_quality: float | None = None) -> dict[str, Any]:
    """A Pareto point by index, or the best quality under ``max_latency``, or the fastest (smallest when
    latency is not an objective) with at least ``min_quality``."""
    front = summary["pareto"]
    if sum(v is not None for v in (point, max_latency, min_quality)) != 1:
        raise ModelpressError("choose one of --point, --max-latency, --min-quality")
    if point is not None:
        if not 0 <= point < len(front):
            raise ModelpressError(f"no point {point}: the front has {len(front)} (0..{len(front) - 1})",
                                  "see pareto.csv")
        return front[point]
    if max_latency is not None:
        if "latency" not in summary["objectives"] or "quality" not in summary["objectives"]:
            raise ModelpressError("--max-latency needs a search over quality and latency")
        ok = [p for p in front if p["objectives"]["latency"] <= max_latency]
        if not ok:
            raise ModelpressError(f"no point is under {max_latency} ms", "see pareto.csv for what was found")
        return max(ok, key=lambda p: p["objectives"]["quality"])
    if "quality" not in summary["objectives"]:
        raise ModelpressError("--min-quality needs a search over quality")
    ok = [p for p in front if p["objectives"]["quality"] >= min_quality]
    if not ok:
        raise ModelpressError(f"no point reaches quality {min_quality}", "see pareto.csv for what was found")
    cost = "latency" if "latency" in summary["objectives"] else "size"
    return min(ok, key=lambda p: p["objectives"][cost])


def extract(run_dir: str | Path, out: str | Path, *, point: int | None = None, max_latency: float | None = None,
            min_quality: float | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the chosen sub-network as a standalone model (safetensors + spec, quantized when its precision
    says so) with its verified ONNX into ``out`` (staged, then renamed)."""
    from modelpress.models.saving import staged_dir, write_into

    run = Path(run_dir)
    if not (run / "pareto.json").is_file():
        raise ModelpressError(f"{run} holds no finished search (pareto.json)", "run modelpress search first")
    summary = json.loads((run / "pareto.json").read_text())
    chosen = choose(summary, point=point, max_latency=max_latency, min_quality=min_quality)
    ev = load_evaluator(run)
    graph, exporter = ev.build(chosen["config"])
    target = Path(out)
    with staged_dir(target, overwrite=overwrite) as tmp:
        write_into(graph, tmp)
        exported = ev.ctx.export(graph, tmp / "model.onnx", exporter=exporter)
        (tmp / "search_point.json").write_text(json.dumps(chosen, indent=1))
    return {"output": str(target), "point": chosen, "onnx": str(target / Path(exported.path).name)}
