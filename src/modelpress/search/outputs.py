"""Outputs of a search: the Pareto set as CSV and JSON (config, objectives measured and predicted), the
hypervolume, a Pareto plot with the baselines, and extraction of a chosen point as a standalone model."""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.bench.runner import write_json_atomic
from modelpress.errors import ModelpressError
from modelpress.search.consistency import latency_agreement, warning_line
from modelpress.search.linas import Problem, hypervolume, pareto_mask
from modelpress.search.space import config_key
from modelpress.search.workers import BASELINE_FILES, load_evaluator


def reference_point(points: np.ndarray) -> np.ndarray:
    """A hypervolume reference point: 10% beyond the worst of ``points`` on each (minimized) objective."""
    worst, best = points.max(axis=0), points.min(axis=0)
    return worst + 0.1 * np.maximum(worst - best, 1e-9)


def _latency_source(summary_objs: list[str], measured: dict[str, Any], records: list[dict[str, Any]]) -> str | None:
    if "latency" not in summary_objs:
        return None
    return "measured" if any(config_key(r["config"]) in measured for r in records) else "predicted-only"


def write_outputs(run: Path, state: dict[str, Any], baselines: dict[str, Any], problem: Problem) -> dict[str, Any]:
    """pareto.json (the summary returned), pareto.csv and pareto.png of a finished (or stopped) search.

    With latency an objective, the reported front is the non-dominated set of the points whose latency was
    measured on the target (measurements.json: every candidate of a measured-latency search, the predicted
    front and the anchors of a predicted one), with the measured latency as the objective and the prediction
    beside it; a search whose latency was never measured says so (``latency_source: predicted-only``)."""
    records = state["records"]
    objs = problem.objectives
    measured = json.loads((run / "measurements.json").read_text()) if (run / "measurements.json").is_file() else {}
    source = _latency_source(objs, measured, records)
    rows = []
    for i, r in enumerate(records):
        values, predicted = dict(r["objectives"]), dict(r["predicted"] or {})
        m = measured.get(config_key(r["config"]))
        if source == "measured":
            if m is None:
                continue  # a predicted latency is not reported as a point of the front
            if "latency" in problem.cheap_objectives:
                predicted["latency"] = values["latency"]  # the latency model's value
            values["latency"] = m["latency"]
        rows.append((i, r, values, predicted, m))
    pts = np.array([problem.vector(v) for _, _, v, _, _ in rows]) if rows else np.zeros((0, len(objs)))
    base = {n: problem.vector(_base_values(p, source)) for n, p in baselines.get("points", {}).items()}
    mask = pareto_mask(pts) if len(pts) else np.zeros(0, dtype=bool)
    front = [rows[k] for k in np.flatnonzero(mask)]
    front.sort(key=lambda row: problem.vector(row[2])[0])
    ref = reference_point(np.vstack([pts, *base.values()]) if base else pts)
    uniform = np.array([v for n, v in base.items() if n.startswith(("uniform", "full"))])
    pareto = [{"point": k, "record": int(i), "config": r["config"], "objectives": v, "predicted": pred or None,
               "measured": m, "batch": r["batch"]} for k, (i, r, v, pred, m) in enumerate(front)]
    summary = {
        "objectives": objs,
        "evaluated": len(records),
        "latency_source": source,
        "latency_mode": "predicted" if "latency" in problem.cheap_objectives else "measured",
        "batches": state["batches"],
        "hypervolume": hypervolume(pts[mask], ref) if len(pts) else 0.0,
        "hypervolume_uniform_baselines": hypervolume(uniform[pareto_mask(uniform)], ref) if len(uniform) else None,
        "reference_point": ref.tolist(),
        "baselines": baselines,
        "pareto": pareto,
        "predictor_error_on_front": predictor_error(pareto, objs),
        "cost": _costs(run),
    }
    if source is not None and "quality" in objs:
        summary["best_within_1pct_of_int8"] = best_within(summary, 0.01)
    write_json_atomic(run / "pareto.json", summary)
    _write_csv(run, summary, problem)
    summary["plot"] = plot(run, summary, records)
    return summary


def _base_values(point: dict[str, Any], source: str | None) -> dict[str, float]:
    values = dict(point["objectives"])
    if source == "measured" and point.get("measured"):
        values["latency"] = point["measured"]["latency"]
    return values


def predictor_error(front: list[dict[str, Any]], objectives: list[str]) -> dict[str, Any]:
    """Per objective with predictions on the front: their mean absolute error against the measured values,
    relative too, over the points that had a prediction."""
    out = {}
    for o in objectives:
        pairs = [(p["predicted"][o], p["objectives"][o]) for p in front if p["predicted"] and o in p["predicted"]]
        if pairs:
            err = [abs(a - b) for a, b in pairs]
            rel = [abs(a - b) / abs(b) for a, b in pairs if b]
            out[o] = {"points": len(pairs), "mae": float(np.mean(err)),
                      "mean_relative": float(np.mean(rel)) if rel else None}
    return out


def best_within(summary: dict[str, Any], tolerance: float) -> dict[str, Any] | None:
    """The front point with the largest measured speedup over full INT8 (else full float) whose quality is
    within ``tolerance`` (relative) of that model's."""
    points = summary["baselines"]["points"]
    ref_name = "full-int8" if "full-int8" in points else "full-float"
    q_ref = points[ref_name]["objectives"]["quality"]
    key = "vs_int8" if ref_name == "full-int8" else "vs_float"
    ok = [p for p in summary["pareto"] if p.get("measured") and p["objectives"]["quality"] >= (1 - tolerance) * q_ref]
    if not ok:
        return None
    best = max(ok, key=lambda p: p["measured"].get(key) or 0.0)
    return {"point": best["point"], "against": ref_name, "speedup": best["measured"].get(key),
            "quality": best["objectives"]["quality"], "reference_quality": q_ref, "tolerance": tolerance}


def _costs(run: Path) -> dict[str, Any] | None:
    path = run / "costs.json"
    if not path.is_file():
        return None
    costs = json.loads(path.read_text())
    if not costs:
        return None
    rec = [c["reconstruct_s"] for c in costs]
    kept = [k for c in costs for k in (c.get("reconstruct_kept") or [])]
    return {"points": len(costs), "seconds_per_point": float(np.mean([c["seconds"] for c in costs])),
            "reconstruct_s_per_point": float(np.mean(rec)), "reconstruct_s_total": float(np.sum(rec)),
            "reconstructed": len(kept), "reconstruction_kept": int(sum(kept))}


def _write_csv(run: Path, summary: dict[str, Any], problem: Problem) -> None:
    objs = summary["objectives"]
    source = summary["latency_source"]
    head: list[str] = ["point"]
    for o in objs:
        head += ["latency_measured_ms", "latency_predicted_ms"] if o == "latency" else [o]
    predicted = [o for o in objs if o != "latency" and o not in problem.cheap_objectives]
    head += [f"{o}_predicted" for o in predicted]
    head += ["latency_source", "speedup_vs_int8_measured"] if source else []
    head.append("config")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    for row in summary["pareto"]:
        pred, m = row["predicted"] or {}, row["measured"] or {}
        cells: list[Any] = [row["point"]]
        for o in objs:
            if o == "latency":
                cells += [m.get("latency", ""), pred.get("latency", "") if source == "measured"
                          else row["objectives"]["latency"]]
            else:
                cells.append(row["objectives"][o])
        cells += [pred.get(o, "") for o in predicted]
        cells += [source, m.get("vs_int8", "")] if source else []
        cells.append(json.dumps(row["config"], sort_keys=True))
        w.writerow(cells)
    tmp = run / ".pareto.csv.tmp"
    tmp.write_text(buf.getvalue())
    tmp.replace(run / "pareto.csv")


def plot(run: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> str | None:
    """pareto.png: quality (or the first objective) against latency (or the second): the front (measured
    latency when measured), every candidate (their latency as the search saw it: predicted in a predicted
    search, marked so), and the baselines. None when matplotlib (extra ``plot``) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    objs = summary["objectives"]
    x_o = "latency" if "latency" in objs else objs[1]
    y_o = "quality" if "quality" in objs else objs[0]
    source = summary["latency_source"]
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    cand = "candidates (predicted latency)" if x_o == "latency" and summary["latency_mode"] == "predicted" \
        else "candidates"
    ax.scatter([r["objectives"][x_o] for r in records], [r["objectives"][y_o] for r in records], s=12,
               c="0.7", label=cand)
    front = summary["pareto"]
    label = "Pareto front" + (" (measured latency)" if source == "measured" else
                              " (PREDICTED latency, not measured)" if source == "predicted-only" else "")
    ax.plot([p["objectives"][x_o] for p in front], [p["objectives"][y_o] for p in front], "o-", c="C0",
            ms=4, label=label)
    for k, (name, p) in enumerate(summary["baselines"].get("points", {}).items()):
        v = _base_values(p, source)
        ax.scatter([v[x_o]], [v[y_o]], marker="*s^vD"[k % 5], s=60, c=f"C{k + 1}", label=name)
    unit = {"latency": " (ms)", "size": " (MB)"}.get(x_o, "")
    if x_o == "latency":
        unit = (" (ms, measured on the target)" if source == "measured"
                else " (ms, PREDICTED by the latency model: not measured)")
    ax.set_xlabel(x_o + unit)
    ax.set_ylabel(y_o)
    if source == "predicted-only":
        ax.set_title("predicted latency only: no point was measured", fontsize=9)
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
        if summary.get("latency_source") != "measured":
            raise ModelpressError("this search's latency is predicted only: --max-latency would select on "
                                  "predicted milliseconds", "choose with --point, or search with measured latency")
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


class LatencyNotReproduced(UserWarning):
    """An extracted point's fresh latency measurement disagrees with the search's beyond noise."""


def extract(run_dir: str | Path, out: str | Path, *, point: int | None = None, max_latency: float | None = None,
            min_quality: float | None = None, overwrite: bool = False, rounds: int | None = None) -> dict[str, Any]:
    """Write the chosen sub-network as a standalone model (safetensors + spec, quantized when its precision
    says so; reconstructed as the search scored it) with its verified ONNX into ``out`` (staged, then renamed).

    With latency an objective, the written ONNX is timed on the target interleaved with the search's full float
    and full INT8 models in ``rounds`` fresh rounds (default: the search's; ``search_point.json``'s
    ``measured_at_extraction``), and those rounds are checked against the rounds the search measured for the
    point (:mod:`modelpress.search.consistency`; ``latency_check``): when they disagree beyond noise the
    search's latency was not reproduced, which a :class:`LatencyNotReproduced` warning says in one line (also
    in the result's ``warnings``)."""
    from modelpress.models.saving import staged_dir, write_into

    run = Path(run_dir)
    if not (run / "pareto.json").is_file():
        raise ModelpressError(f"{run} holds no finished search (pareto.json)", "run modelpress search first")
    if rounds is not None and rounds < 1:
        raise ModelpressError(f"rounds must be at least 1, got {rounds}")
    summary = json.loads((run / "pareto.json").read_text())
    chosen = choose(summary, point=point, max_latency=max_latency, min_quality=min_quality)
    ev = load_evaluator(run)
    graph, exporter = ev.build(chosen["config"])
    target = Path(out)
    warnings_: list[str] = []
    with staged_dir(target, overwrite=overwrite) as tmp:
        write_into(graph, tmp)
        exported = ev.ctx.export(graph, tmp / "model.onnx", exporter=exporter)
        bases = {n: run / rel for n, rel in BASELINE_FILES.items() if (run / rel).is_file()}
        if "latency" in summary["objectives"] and "full-float" in bases:
            n_rounds = rounds or ev.settings.rounds
            ms = ev.measure_latency({"point": Path(exported.path)}, bases, summary["baselines"].get("reference_ms"),
                                    rounds=n_rounds)
            check = latency_agreement(_searched_measurement(run, chosen), ms["point"])
            chosen = {**chosen, "measured_at_extraction": ms["point"], "latency_check": check}
            line = warning_line(check, n_rounds)
            if line is not None:
                warnings_.append(line)
        (tmp / "search_point.json").write_text(json.dumps(chosen, indent=1))
    for line in warnings_:
        warnings.warn(line, LatencyNotReproduced, stacklevel=2)
    return {"output": str(target), "point": chosen, "onnx": str(target / Path(exported.path).name),
            "warnings": warnings_}


def _searched_measurement(run: Path, chosen: dict[str, Any]) -> dict[str, Any] | None:
    """The search's measurement of the chosen point: its measurements.json row (per-round speedups), else what
    pareto.json holds for it, else None (a predicted-only search)."""
    path = run / "measurements.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}
    return rows.get(config_key(chosen["config"])) or chosen.get("measured")
