"""Multi-objective search (issue 11): our LINAS (predictors + NSGA-II) against random search and uniform width
scaling with the same number of real evaluations, with and without InstaTune super-network fine-tuning.

Parts (``--parts vit,minilm,dynast``; each merges its results into the JSON):

- ``vit``: the zoo's digits ViT (``modelpress.train.zoo.digits_vit``, cached); objectives accuracy (held-out
  digits), latency at batch 64 (at batch 1 this tiny model is overhead-bound) and size; genes: heads, MLP width, block kept, and INT8/float per Linear.
- ``minilm``: the pretrained all-MiniLM-L6-v2 (``modelpress.load()``); objectives fidelity (mean cosine to
  the FP32 model's embeddings on held-out packaged sentences) and latency at batch 1, sequence 128 (the block
  latency table on the search space's widths is built once and cached; wall clock, so build it on a quiet
  machine).
- ``dynast``: DyNAS-T's own LINAS (the ``dynast`` package, in its own venv) on the ViT objective, its front
  measured against the same full float and INT8 files, or why not.

Every method gets the same number of real evaluations, and every evaluated sub-network is reconstructed
(layer-wise least squares on the calibration split) before its quality is scored. LINAS is steered by predicted
latency (the block table and the measured per-layer precision table); random and uniform widths are scored the
same way. Then every method's predicted front is exported and timed in ONE interleaved ONNX Runtime run with the
full float and full INT8 models (fresh sessions each round, median of per-round ratios): the JSON holds, per
front point, ``latency_predicted_ms`` beside ``latency_measured_ms`` and the measured speedups over full float
and full INT8. Per model: hypervolume of each method's measured front (one reference point for all methods of
the model: 10% beyond the worst measured point); the best measured speedup over full INT8 whose quality is
within 1% (also 2% and 5%; relative) of full INT8's; the predictor's error on the LINAS fronts and its Kendall
tau on the random candidates (held out); what reconstruction cost per point; the same search after InstaTune
fine-tuning (same evaluation budget; the fine-tuning steps are stated). Every search measures its anchors first
(full float and INT8, the smallest and uniform-width INT8 sub-networks), within its budget.

Extraction check (``extraction_check`` per search run): the search's best point (best measured speedup over full
INT8 within 1% of its quality, else its fastest measured point) is extracted as ``modelpress search extract``
writes it, timed again in ``--rounds`` fresh rounds interleaved with full float and full INT8, and those rounds
are compared with the rounds the search measured for the point (Welch t on log per-round speedups, a 5% floor:
``modelpress.search.consistency``): the verdict, the statistic, p-value and interval of fresh over searched,
per reference. ``builds`` counts the sub-networks each part built (each cut one is reconstructed).

Time: about 60-65 minutes on 2 quiet cores for a full default run (the earlier 40 minutes predate reconstruction
of every evaluated point; at the earlier budgets, 48 / 32 evaluations and 1000 / 600 InstaTune steps, the same
arithmetic gives about 2.5 hours). Reconstruction dominates, so the arithmetic counts sub-networks built. Per built
point, measured here with this benchmark's settings (quality only, one process, 2 threads, 10-12 points with
their anchors; a shared machine at load 4-5 where the process got about one core, so the quiet figure is its CPU
time over 1.2 for the ViT's small ops and 1.7 for MiniLM's matmuls, the parallel share 2 threads reached):

- digits ViT: 14.5 s wall = 14.5 CPU-s a point (two runs of 12: reconstruction 1-48 s of it), quiet ~12 s;
  InstaTune 0.31 CPU-s a step (100 steps), quiet ~0.25 s (0.225 s in the earlier quiet run);
- MiniLM: 28.6 s a point on average, 42.6 s a cut random point (reconstruction 8-72 s), quiet ~25 s;
  InstaTune 4.3 CPU-s a step (20 steps, hidden-state distillation on), quiet ~2.5 s (1.9 s without it earlier).

Built per part with budget B (each method B evaluations, uniform widths at most B distinct, fronts about 5
points on the ViT's three objectives and 4 on MiniLM's two): the searches' B each, the fronts each search times
at its end (about 3 beyond its timed anchors), random B, uniform, DyNAS-T B (ViT), every method's front again
in the one interleaved run, 2 extractions:

- ViT, B = 12: 4 x 12 + 7 + 2 x 3 + 5 x 5 + 2 = 88 builds x 12 s = 18 min; InstaTune 500 x 0.25 s = 2 min;
  timing (precision table, fronts at 5 rounds), the searches' set-up, DyNAS-T's proposals: about 8 min. 28 min.
- MiniLM, B = 12: 3 x 12 + 5 + 2 x 2 + 4 x 4 + 2 = 63 builds x 25 s = 26 min; InstaTune 150 x 2.5 s = 6 min;
  timing and set-up about 6 min (its block latency table cached; building it is extra). 38 min.

So B = 12 on both (anchors 6 and 5 of them, then 2-3 random, then one LINAS batch of 4) is what an hour holds;
each 4 more evaluations per method add about 4 minutes on the ViT (4 methods x 4 x 12 s) and 5 on MiniLM
(3 x 4 x 25 s), and MiniLM's earlier 600 InstaTune steps about 19 minutes (``--budget``, ``--minilm-budget``,
``--minilm-tune-steps``). ``part_seconds`` in the JSON says what a run took.

Writes benchmarks/results/search.json (and search.png when matplotlib is importable).

    python benchmarks/search.py                      # vit + minilm + dynast (about an hour on 2 quiet cores)
    python benchmarks/search.py --quick              # smoke run: tiny budgets
    python benchmarks/search.py --parts vit          # a subset (merged into the JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, console, fmt, previous_results, quiet, run_parts  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PARTS = ("vit", "minilm", "dynast")
THREADS = 2
BATCH, SEQ = 1, 128
WITHIN = 0.01  # quality within 1% (relative) of the full INT8 model
TOLERANCES = (0.01, 0.02, 0.05)  # the speedup at these quality losses (relative to full INT8) is reported too
VIT_GRID = "heads=1,4;mlp=64,256;embed=64"
VIT_BATCH = 64  # the tiny ViT is overhead-bound at batch 1 (every sub-network ~0.3 ms): latency at batch 64
MINILM_GRID = "heads=3,6,9,12;head_dim=32;mlp=384,768,1152,1536;embed=384"  # the search space's widths
VIT_THREADS = 1  # the ViT's block table is timed on the process CPU clock (steady under load): one thread
DYNAST_VENV = Path("/tmp/dynast-venv")
DYNAST_WHEEL = Path("/tmp/pkgs/dynast-1.6.0-py3-none-any.whl")


# --------------------------------------------------------------------------------------------- helpers


def _vector(objectives: list[str], values: dict[str, float]) -> np.ndarray:
    from modelpress.search.evaluate import as_minimize

    return as_minimize(objectives, values)


def _hv(objectives: list[str], points: list[dict[str, float]], ref: np.ndarray) -> float:
    from modelpress.search.linas import hypervolume, pareto_mask

    if not points:
        return 0.0
    pts = np.array([_vector(objectives, p) for p in points])
    return float(hypervolume(pts[pareto_mask(pts)], ref))


def _evaluate(ev, configs: list[dict[str, Any]], objectives: list[str]) -> list[dict[str, float]]:  # noqa: ANN001
    """Real evaluations of ``configs`` with a run's evaluator (as the search scores its candidates)."""
    out = []
    for c in configs:
        with quiet():
            r = {**ev.evaluate(c)["objectives"], **ev.cheap(c)}  # quality after reconstruction; predicted latency
        out.append({o: float(r[o]) for o in objectives})
    return out


def _distinct(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from modelpress.search.space import dedupe

    return dedupe(configs, set())


def _search(graph, ctx, run: Path, args, opts: dict[str, Any], finetune: dict | None, reporter,  # noqa: ANN001
            tables: dict[str, Any]) -> dict:
    from modelpress.search.run import SearchSpec, run_search

    t0 = time.perf_counter()
    spec = SearchSpec(budget=args.budget, batch_size=args.batch, finetune=finetune, generations=args.generations,
                      pop_size=args.pop_size, latency="predicted", rounds=args.rounds,
                      reconstruct_target=args.reconstruct_target, reconstruct_samples=args.reconstruct_samples, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run_search(graph, ctx, run, spec, reporter=reporter, **tables)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def _predicted_front(objectives: list[str], pts: list[tuple[dict, dict]]) -> list[tuple[dict, dict]]:
    from modelpress.search.linas import pareto_mask

    vec = np.array([_vector(objectives, v) for _, v in pts])
    return [pts[i] for i in np.flatnonzero(pareto_mask(vec))]


def measure_fronts(fronts: dict[str, list[tuple[Any, dict, dict]]], ev, bases: dict[str, Path], tmp: Path,  # noqa: ANN001
                   rounds: int, reporter) -> dict[str, list[dict[str, Any]]]:  # noqa: ANN001
    """Every method's predicted front (config, predicted values, the evaluator that builds it), exported and timed
    in ONE interleaved run with full float and full INT8 (fresh sessions each round): per point its predicted
    and measured latency and its measured speedups over full float and full INT8."""
    files: dict[str, Path] = {}
    names: dict[tuple[int, str], str] = {}
    for pts in fronts.values():
        for e, config, _ in pts:
            key = (id(e), json.dumps(config, sort_keys=True))
            if key not in names:
                names[key] = f"p{len(names):03d}"
                with quiet():
                    files[names[key]] = e.export(config, tmp / "fronts" / f"{names[key]}.onnx")
    with reporter.step(f"one interleaved measurement of {len(files)} front points against full float and INT8"), quiet():
        ms = ev.measure_latency(files, bases, rounds=rounds) if files else {}
    out: dict[str, list[dict[str, Any]]] = {}
    for method, pts in fronts.items():
        rows = []
        for e, config, values in pts:
            m = ms[names[(id(e), json.dumps(config, sort_keys=True))]]
            rows.append({"config": config, "quality": values["quality"], "latency_predicted_ms": values["latency"],
                         "latency_measured_ms": m["median_ms"], "speedup_vs_float_measured": m["vs_float"],
                         "speedup_vs_int8_measured": m.get("vs_int8"),
                         **({"size": values["size"]} if "size" in values else {})})
        out[method] = rows
    out["__baselines__"] = [{"name": n, "latency_measured_ms": ms[n]["median_ms"]} for n in bases]
    out["__exported__"] = len(files)  # each one more reconstruction
    return out


def extraction_check(run: Path, summary: dict[str, Any], out: Path, rounds: int, reporter) -> dict[str, Any]:  # noqa: ANN001
    """The search's best point extracted as a user extracts it (``modelpress search extract``): the written ONNX
    timed in ``rounds`` fresh rounds interleaved with full float and full INT8, and those rounds checked against
    the rounds the search measured for the point (Welch t on log speedups, modelpress.search.consistency).
    The point: the best measured speedup over full INT8 within 1% of its quality, else the front's fastest
    measured point over full INT8."""
    from modelpress.search.outputs import extract
    from modelpress.search.space import config_key

    best = summary.get("best_within_1pct_of_int8")
    if best is not None:
        k, why = best["point"], "best measured speedup over full INT8 within 1% of its quality"
    else:
        timed = [p for p in summary["pareto"] if (p.get("measured") or {}).get("vs_int8")]
        if not timed:
            return {"status": "not run", "reason": "no front point was measured against full INT8"}
        k, why = max(timed, key=lambda p: p["measured"]["vs_int8"])["point"], "fastest measured front point over full INT8 (none within 1%)"
    with reporter.step(f"extracting point {k} of {run.name} and timing it in {rounds} fresh rounds"), quiet(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract(run, out, point=k, rounds=rounds, overwrite=True)
    point = result["point"]
    searched = json.loads((run / "measurements.json").read_text()).get(config_key(point["config"]), {})
    fresh = point.get("measured_at_extraction") or {}
    return {"status": "ok", "point": k, "why": why, "config": point["config"], "quality": point["objectives"]["quality"],
            "searched": {k_: searched.get(k_) for k_ in ("vs_float", "vs_int8", "rounds_vs_float", "rounds_vs_int8")},
            "fresh": {k_: fresh.get(k_) for k_ in ("vs_float", "vs_int8", "rounds_vs_float", "rounds_vs_int8")},
            "check": point.get("latency_check"), "warnings": result["warnings"]}


def compare(name: str, graph, ctx, args, tmp: Path, opts: dict[str, Any], finetune: dict, reporter,  # noqa: ANN001
            budget: int, tables: dict[str, Any]) -> dict[str, Any]:
    """LINAS vs LINAS + InstaTune vs random vs uniform width (same real evaluations, every sub-network
    reconstructed before it is scored); each method's predicted front measured in one interleaved run against
    full float and full INT8; hypervolume on one reference point over the measured fronts; the best measured
    speedup over full INT8 within 1% (2%, 5%) of its quality; the predictor's Kendall tau."""
    import torch

    from modelpress.search.linas import fit_predictor, kendall_tau
    from modelpress.search.outputs import reference_point
    from modelpress.search.precision import PrecisionTable
    from modelpress.search.run import load_evaluator

    torch.set_num_threads(THREADS)
    args = argparse.Namespace(**{**vars(args), "budget": budget})
    objectives = opts["objectives"]
    out: dict[str, Any] = {"objectives": objectives, "budget": {
        "evaluations_per_method": args.budget, "batch": args.batch, "generations": args.generations,
        "pop_size": args.pop_size, "eval_samples": args.n_eval, "instatune": finetune,
        "reconstruct": {"target": args.reconstruct_target, "train_samples": args.reconstruct_samples,
                        "held_back": "the calibration split's last batch decides whether a refit is kept"}}}

    with reporter.step(f"{name}: LINAS search, {args.budget} real evaluations"):
        linas = _search(graph, ctx, tmp / f"{name}-linas", args, opts, None, reporter, tables)
    # the same measured precision table for both searches (measured once, by the first)
    precision = tmp / f"{name}-linas" / "precision.json"
    shared = dict(tables)
    if precision.is_file():
        shared["precision_table"] = PrecisionTable.from_dict(json.loads(precision.read_text()))
    with reporter.step(f"{name}: InstaTune ({finetune['steps']} steps) + LINAS search, {args.budget} evaluations"):
        tuned = _search(graph, ctx, tmp / f"{name}-instatune", args, opts, finetune, reporter, shared)
    # the extracted best point's fresh rounds against the search's (per search run)
    out["extraction_check"] = {
        m: extraction_check(tmp / f"{name}-{m.replace('linas+', '')}", summ, tmp / f"{name}-{m}-extracted",
                            args.rounds, reporter)
        for m, summ in (("linas", linas), ("linas+instatune", tuned))}
    ev = load_evaluator(tmp / f"{name}-linas")
    tuned_ev = load_evaluator(tmp / f"{name}-instatune")
    space = ev.net.space
    state = json.loads((tmp / f"{name}-linas" / "state.json").read_text())
    tuned_state = json.loads((tmp / f"{name}-instatune" / "state.json").read_text())
    sets: dict[str, list[tuple[dict, dict]]] = {
        "linas": [(r["config"], r["objectives"]) for r in state["records"]],
        "linas+instatune": [(r["config"], r["objectives"]) for r in tuned_state["records"]],
    }
    rng = np.random.default_rng(args.seed + 1)
    random_cfgs = _distinct([space.random(rng) for _ in range(4 * args.budget)])[: args.budget]
    with reporter.step(f"{name}: random search, {len(random_cfgs)} evaluations"):
        t0 = time.perf_counter()
        sets["random"] = list(zip(random_cfgs, _evaluate(ev, random_cfgs, objectives), strict=True))
        random_s = time.perf_counter() - t0
    precisions = [p for p in ("float", "int8") if p in space.precisions]
    fractions = np.linspace(0.05, 1.0, max(2, args.budget // len(precisions)))
    uniform_cfgs = _distinct([space.uniform(float(f), p) for f in fractions for p in precisions])[: args.budget]
    with reporter.step(f"{name}: uniform width scaling, {len(uniform_cfgs)} evaluations"):
        sets["uniform"] = list(zip(uniform_cfgs, _evaluate(ev, uniform_cfgs, objectives), strict=True))

    evaluators = {"linas+instatune": tuned_ev}
    fronts = {m: [(evaluators.get(m, ev), c, v) for c, v in _predicted_front(objectives, pts)]
              for m, pts in sets.items()}
    bases = {n: tmp / f"{name}-linas" / "baselines" / f"{n}.onnx" for n in ("full-float", "full-int8")}
    bases = {n: p for n, p in bases.items() if p.is_file()}
    measured = measure_fronts(fronts, ev, bases, tmp / name, args.rounds, reporter)
    base_ms = {b["name"]: b["latency_measured_ms"] for b in measured.pop("__baselines__")}
    # what the part's time went into: sub-networks built (each reconstructed when cut), by whom
    out["builds"] = {"search_linas": (linas.get("cost") or {}).get("points"),
                     "search_linas+instatune": (tuned.get("cost") or {}).get("points"),
                     "random": len(sets["random"]), "uniform": len(sets["uniform"]),
                     "fronts_exported": measured.pop("__exported__"), "extractions": len(out["extraction_check"]),
                     "note": "a search's count is its budget plus the front points it rebuilt to time them"}

    def as_values(row: dict[str, Any]) -> dict[str, float]:
        return {"quality": row["quality"], "latency": row["latency_measured_ms"],
                **({"size": row["size"]} if "size" in row else {})}

    base = linas["baselines"]["points"]
    base_values = {n: {**p["objectives"], "latency": base_ms.get(n, p["objectives"]["latency"])}
                   for n, p in base.items() if n in base_ms}
    every = [_vector(objectives, as_values(r)) for rows in measured.values() for r in rows]
    every += [_vector(objectives, v) for v in base_values.values()]
    ref = reference_point(np.array(every))
    out["reference_point"] = ref.tolist()
    out["baselines"] = {n: {**p["objectives"], **({"latency_measured_ms": base_ms[n]} if n in base_ms else {}),
                            "latency_predicted_ms": p["objectives"]["latency"]} for n, p in base.items()}
    out["methods"] = {}
    q_int8 = base.get("full-int8", base["full-float"])["objectives"]["quality"]
    for m, pts in sets.items():
        rows = measured[m]
        row: dict[str, Any] = {"evaluations": len(pts), "front_measured": rows,
                               "hypervolume": _hv(objectives, [as_values(r) for r in rows], ref),
                               "best_quality": max(v["quality"] for _, v in pts), "best_within": {}}
        for tol in TOLERANCES:
            ok = [r for r in rows if r["quality"] >= (1.0 - tol) * q_int8 and r["speedup_vs_int8_measured"]]
            if ok:
                best = max(ok, key=lambda r: r["speedup_vs_int8_measured"])
                row["best_within"][f"{tol:.0%}"] = {
                    "config": best["config"], "quality": best["quality"],
                    "measured_speedup_vs_int8": best["speedup_vs_int8_measured"],
                    "predicted_speedup_vs_int8": base["full-int8"]["objectives"]["latency"] / best["latency_predicted_ms"]
                    if "full-int8" in base else None}
        if f"{WITHIN:.0%}" in row["best_within"]:
            row["best_within_1pct"] = row["best_within"][f"{WITHIN:.0%}"]
        out["methods"][m] = row
    out["methods"]["linas"]["seconds"] = linas["seconds"]
    out["methods"]["linas+instatune"]["seconds"] = tuned["seconds"]
    out["methods"]["random"]["seconds"] = round(random_s, 1)
    out["reconstruction_cost"] = {"linas": linas.get("cost"), "linas+instatune": tuned.get("cost")}
    out["predictor_error_on_front"] = {"linas": linas.get("predictor_error_on_front"),
                                       "linas+instatune": tuned.get("predictor_error_on_front")}

    # predictor rank correlation: fit on the LINAS run's measured candidates, score the random ones (held out)
    lo, up = space.bounds()
    span = np.maximum(up - lo, 1)
    feats = (np.array([r["x"] for r in state["records"]]) - lo) / span
    held = (np.array([space.encode(c) for c, _ in sets["random"]]) - lo) / span
    taus = {}
    for o in objectives:
        if o in ev.cheap_objectives():
            continue
        p = fit_predictor(feats, np.array([r["objectives"][o] for r in state["records"]]), args.seed)
        taus[o] = {"model": p.name, "kendall_tau": kendall_tau(p.predict(held), [v[o] for _, v in sets["random"]]),
                   "train": len(feats), "held_out": len(held)}
    out["predictor"] = taus
    out["in_search_kendall_tau"] = [b.get("kendall_tau") for b in state["batches"][1:]]
    out["precision_table"] = json.loads(precision.read_text()) if precision.is_file() else None
    out["plot_points"] = {m: [as_values(r) for r in measured[m]] for m in sets}
    out["plot_points_predicted"] = {m: [v for _, v in pts] for m, pts in sets.items()}
    return out


# ------------------------------------------------------------------------------------------------ parts


def run_vit(args, tmp: Path, reporter) -> dict[str, Any]:  # noqa: ANN001
    import modelpress
    from modelpress.bench import build_latency_table, get_target
    from modelpress.data import infer_task, load_data
    from modelpress.passes import Context
    from modelpress.train.zoo import digits_vit

    with reporter.step("digits ViT (zoo, cached)"), quiet():
        zoo = digits_vit(seed=args.seed)
        graph = modelpress.load(str(zoo.path))
    data = load_data("digits", graph.input_spec, None, batch_size=64, n_calibration=64, n_evaluation=args.n_eval,
                     seed=args.seed)
    target = get_target("ort-cpu", VIT_THREADS)
    ctx = Context(workdir=tmp / "vit-work", task=infer_task(graph.input_spec, graph.module), data=data,
                  target=target, reference=graph, seed=args.seed, reporter=reporter)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    with reporter.step("latency table of the digits ViT (small grid, cached)"), quiet():
        table = build_latency_table(graph, target, batch=VIT_BATCH, grid=VIT_GRID, rounds=2, runs=5, min_time_s=0.02,
                                    model_rounds=2, clock="cpu")
    opts = {"objectives": ("quality", "latency", "size"), "uniform": (0.25, 0.5, 0.75),
            "space": {"mlp_fractions": (0.25, 0.5, 0.75, 1.0)}}
    finetune = {"steps": args.vit_tune_steps, "lr": args.vit_tune_lr, "warmup_steps": min(50, args.vit_tune_steps // 10), "batch_size": 32, "n_random": 2,
                "seed": args.seed, "hidden_weight": args.hidden_weight}
    res = compare("vit", graph, ctx, args, tmp, opts, finetune, reporter, args.budget, {"latency_table": table})
    res["model"] = {"name": "digits ViT (zoo)", "params": graph.num_parameters(), "quality": "accuracy",
                    "latency": f"searched on predicted latency (block table grid {VIT_GRID}, CPU clock, and the "
                               f"measured precision table); fronts measured, ort-cpu {VIT_THREADS} thread, batch "
                               f"{VIT_BATCH}, interleaved with full float and full INT8"}
    return res


def run_minilm(args, tmp: Path, reporter) -> dict[str, Any]:  # noqa: ANN001
    import modelpress
    from modelpress.bench import build_latency_table, get_target
    from modelpress.bench.latency import cache_path
    from modelpress.data import EmbeddingTask, load_data
    from modelpress.passes import Context

    target = get_target("ort-cpu", THREADS)
    with reporter.step("loading all-MiniLM-L6-v2"), quiet():
        graph = modelpress.load()
    with reporter.step(f"latency table of MiniLM on the search grid {MINILM_GRID} (cached; wall clock: quiet machine)"):
        table = build_latency_table(graph, target, batch=BATCH, seq=SEQ, grid=MINILM_GRID, reporter=reporter)
    path = cache_path(table.key)
    # 256 calibration sentences: reconstruction refits fc2 (1536 inputs) from ~15 real tokens a sentence; 64
    # sentences gave fewer rows than unknowns (a damped, not exact, refit)
    data = load_data(None, graph.input_spec, graph.tokenizer, batch_size=16, n_calibration=256,
                     n_evaluation=args.minilm_eval, seed=args.seed)
    ctx = Context(workdir=tmp / "minilm-work", task=EmbeddingTask(), data=data, target=target, reference=graph,
                  seed=args.seed, reporter=reporter)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    opts = {"objectives": ("quality", "latency"), "uniform": (0.25, 0.5, 0.75)}
    finetune = {"steps": args.minilm_tune_steps, "lr": args.minilm_tune_lr, "warmup_steps": min(10, args.minilm_tune_steps // 10), "batch_size": 8, "n_random": 1,
                "seed": args.seed, "hidden_weight": args.hidden_weight}
    res = compare("minilm", graph, ctx, args, tmp, opts, finetune, reporter, args.minilm_budget,
                  {"latency_table": table})
    res["model"] = {"name": "all-MiniLM-L6-v2", "params": graph.num_parameters(),
                    "quality": "fidelity_mean (cosine to FP32 embeddings)",
                    "latency": f"searched on the latency table {path.name} (grid {MINILM_GRID}) and the measured "
                               f"precision table; fronts measured, ort-cpu {THREADS} threads, batch {BATCH}, "
                               f"sequence {SEQ}, interleaved with full float and full INT8"}
    return res


DYNAST_PROBE = """
import json, sys
out = {}
try:
    import dynast  # noqa: F401
    out["import_dynast"] = "ok"
except Exception as exc:  # noqa: BLE001
    out["import_dynast"] = f"{type(exc).__name__}: {exc}"
    for k in [k for k in sys.modules if k == "dynast" or k.startswith(("dynast.", "fairseq"))]:
        del sys.modules[k]
try:
    sys.path.insert(0, sys.argv[1])
    from _dynast_linas import import_parts
    import_parts()
    from dynast.predictors.dynamic_predictor import Predictor  # noqa: F401
    from dynast.search.encoding import EncodingBase  # noqa: F401
    from dynast.search.evolutionary import EvolutionaryManager  # noqa: F401
    from importlib.metadata import version
    out.update(ok=True, version=version("dynast"))
except Exception as exc:  # noqa: BLE001
    out.update(ok=False, reason=f"{type(exc).__name__}: {exc}")
print(json.dumps(out))
"""


def _dynast_step(python: Path, request: dict[str, Any]) -> list[list[int]]:
    proc = subprocess.run([str(python), str(Path(__file__).with_name("_dynast_linas.py"))],
                          input=json.dumps(request), capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"DyNAS-T step failed (exit {proc.returncode}): {(proc.stderr or '').strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["population"]


def run_dynast(args, tmp: Path, reporter, results: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    """DyNAS-T's LINAS (its random start, predictors and evolutionary search, in its own venv) on the ViT
    objective, with the same number of real evaluations; or the exact reason it cannot run here."""
    python = DYNAST_VENV / "bin" / "python"
    out: dict[str, Any] = {"package": "dynast 1.6.0", "wheel": str(DYNAST_WHEEL),
                           "install": f"python3.11 -m venv {DYNAST_VENV} && {DYNAST_VENV}/bin/pip install {DYNAST_WHEEL}"}
    if not python.is_file():
        out.update(status="not run", reason=f"no venv at {DYNAST_VENV} (install it with the command above)")
        return out
    proc = subprocess.run([str(python), "-c", DYNAST_PROBE, str(Path(__file__).parent)], capture_output=True, text=True, timeout=300, check=False)
    try:
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        probe = {"ok": False, "reason": (proc.stderr or proc.stdout).strip()[-600:]}
    out["probe"] = probe
    if not probe["ok"]:
        out.update(status="not run", reason=f"dynast is not importable in {DYNAST_VENV}: {probe['reason']}")
        return out
    from modelpress.search.outputs import reference_point
    from modelpress.search.run import load_evaluator

    run = tmp / "vit-linas"
    if not (run / "state.json").is_file():
        out.update(status="not run", reason="run together with the vit part (--parts vit,dynast): it reuses its "
                                            "super-network, evaluator and reference point")
        return out
    ev = load_evaluator(run)
    space = ev.net.space
    objectives = results["vit"]["objectives"]
    lo, up = space.bounds()
    inner = 2 * args.batch * args.generations
    out["adapter"] = ("DyNAS-T 1.6 LINAS.search only runs its registered super-networks; benchmarks/_dynast_linas.py "
                      "runs the same loop with DyNAS-T's own EncodingBase (random start, one-hot features), "
                      "Predictor (ridge/SVR grid search) and EvolutionaryManager (U-NSGA-III for 3 objectives), "
                      "population = the LINAS batch, inner-loop evaluations = 2 x batch x generations")
    out["budget"] = {"evaluations": args.budget, "population": args.batch, "inner_evals": inner}
    measured: list[tuple[list[int], dict[str, float]]] = []
    t0 = time.perf_counter()
    loop = 0
    seen: set[str] = set()
    while len(measured) < args.budget:
        with reporter.step(f"DyNAS-T LINAS loop {loop}: proposing"):
            pop = _dynast_step(python, {"upper": (up - lo).tolist(), "population": max(args.batch, 6), "inner_evals": inner,
                                        "seed": args.seed + loop, "measured": [
                                            [x, _vector(objectives, v).tolist()] for x, v in measured]})
        fresh = []
        for x in pop:
            k = json.dumps(x)
            if k not in seen:
                seen.add(k)
                fresh.append(x)
        fresh = fresh[: args.budget - len(measured)]
        if not fresh:
            break
        configs = [space.decode(np.asarray(x) + lo) for x in fresh]
        with reporter.step(f"DyNAS-T LINAS loop {loop}: measuring {len(configs)}"):
            measured += list(zip(fresh, _evaluate(ev, configs, objectives), strict=True))
        loop += 1
    out["seconds"] = round(time.perf_counter() - t0, 1)
    vit = results["vit"]
    pts = [(space.decode(np.asarray(x) + lo), v) for x, v in measured]
    bases = {n: run / "baselines" / f"{n}.onnx" for n in ("full-float", "full-int8")}
    front = measure_fronts({"dynast-linas": [(ev, c, v) for c, v in _predicted_front(objectives, pts)]}, ev,
                           {n: p for n, p in bases.items() if p.is_file()}, tmp / "dynast", args.rounds, reporter)
    rows = front["dynast-linas"]
    values = [{"quality": r["quality"], "latency": r["latency_measured_ms"],
               **({"size": r["size"]} if "size" in r else {})} for r in rows]
    out["note"] = ("its front is measured in its own interleaved run (against the same full float and full INT8 "
                   "files), not in the vit part's")
    every = [_vector(objectives, p) for m in vit["plot_points"].values() for p in m]
    every += [_vector(objectives, p) for p in values]
    ref = reference_point(np.array(every))
    out["reference_point"] = ref.tolist()
    out["evaluations"] = len(measured)
    out["front_measured"] = rows
    out["hypervolume_same_reference"] = {
        "dynast-linas": _hv(objectives, values, ref),
        **{m: _hv(objectives, p, ref) for m, p in vit["plot_points"].items()}}
    q_int8 = vit["baselines"].get("full-int8", vit["baselines"]["full-float"])["quality"]
    ok = [r for r in rows if r["quality"] >= (1 - WITHIN) * q_int8 and r["speedup_vs_int8_measured"]]
    if ok:
        best = max(ok, key=lambda r: r["speedup_vs_int8_measured"])
        out["best_within_1pct"] = {"quality": best["quality"],
                                   "measured_speedup_vs_int8": best["speedup_vs_int8_measured"]}
    out["best_quality"] = max(v["quality"] for _, v in measured)
    out["points"] = [v for _, v in measured]
    out["status"] = "ok"
    return out


# -------------------------------------------------------------------------------------------- reporting


def print_tables(con, results: dict[str, Any]) -> None:  # noqa: ANN001
    from rich.table import Table

    for part in ("vit", "minilm"):
        r = results.get(part)
        if not r or "methods" not in r:
            continue
        t = Table(title=f"search: {r['model']['name']} ({', '.join(r['objectives'])}; "
                        f"{r['budget']['evaluations_per_method']} evaluations per method)")
        tols = [f"{t:.0%}" for t in TOLERANCES]
        for col in ("method", "evals", "hypervolume (measured)", "best quality",
                    *[f"vs INT8 @ -{t} measured (pred.)" for t in tols], "seconds"):
            t.add_column(col, justify="right" if col != "method" else "left")
        for m, row in r["methods"].items():
            cells = []
            for tol in tols:
                b = (row.get("best_within") or {}).get(tol) or {}
                cells.append(fmt(b.get("measured_speedup_vs_int8"), ".2f", "x")
                             + (f" ({b['predicted_speedup_vs_int8']:.2f}x)" if b.get("predicted_speedup_vs_int8") else ""))
            t.add_row(m, str(row["evaluations"]), fmt(row["hypervolume"], ".4g"), fmt(row["best_quality"], ".4f"),
                      *cells, fmt(row.get("seconds"), ".0f"))
        con.print(t)
        taus = ", ".join(f"{o}: {v['kendall_tau']:.3f} ({v['model']}, {v['train']} train / {v['held_out']} held out)"
                         for o, v in r["predictor"].items() if v["kendall_tau"] is not None)
        con.print(f"  predictor Kendall tau on held-out candidates: {taus or '-'}")
        errors = {m: e for m, e in (r.get("predictor_error_on_front") or {}).items() if e}
        con.print(f"  predictor error on the front (predicted vs measured): {json.dumps(errors)}")
        con.print(f"  reconstruction cost: {json.dumps(r.get('reconstruction_cost'))}")
        for m, c in (r.get("extraction_check") or {}).items():
            if c.get("status") != "ok" or not c.get("check"):
                con.print(f"  extraction check ({m}): {c.get('status')} ({c.get('reason')})")
                continue
            refs = ", ".join(f"{k} {v['searched_median']:.3f}x searched vs {v['fresh_median']:.3f}x fresh"
                             + (f" (p={v['p_value']:.2g})" if v["p_value"] is not None else "")
                             for k, v in c["check"]["references"].items())
            con.print(f"  extraction check ({m}, point {c['point']}): {c['check']['verdict']}: {refs}")
        con.print("  full float / INT8: " + ", ".join(
            f"{n} {json.dumps({k: round(v, 4) for k, v in o.items()})}" for n, o in r["baselines"].items()
            if n.startswith("full")))
    d = results.get("dynast")
    if d and d.get("status") == "ok":
        hv = ", ".join(f"{m} {v:.4g}" for m, v in d["hypervolume_same_reference"].items())
        b = (d.get("best_within_1pct") or {}).get("measured_speedup_vs_int8")
        con.print(f"DyNAS-T LINAS on the digits ViT ({d['evaluations']} evaluations): hypervolume (one reference) "
                  f"{hv}; best quality {d['best_quality']:.4f}; speedup vs INT8 @ -1% {fmt(b, '.2f', 'x')}")
    elif d:
        con.print(f"DyNAS-T: {d.get('status')} ({d.get('reason')})")


def plot(results: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    parts = [p for p in ("vit", "minilm") if p in results and "plot_points" in results[p]]
    if not parts:
        return None
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.4), dpi=120, squeeze=False)
    style = {"linas": ("C0", "o"), "linas+instatune": ("C2", "s"), "random": ("C7", "x"), "uniform": ("C3", "^")}
    for ax, part in zip(axes[0], parts, strict=True):
        r = results[part]
        for m, pts in r.get("plot_points_predicted", {}).items():
            c, mk = style.get(m, ("k", "."))
            ax.scatter([p["latency"] for p in pts], [p["quality"] for p in pts], s=8, c=c, marker=mk, alpha=0.25)
        for m, pts in r["plot_points"].items():
            c, mk = style.get(m, ("k", "."))
            pts = sorted(pts, key=lambda p: p["latency"])
            ax.plot([p["latency"] for p in pts], [p["quality"] for p in pts], c=c, marker=mk, ms=5,
                    label=f"{m} front (measured)")
        for n, o in r["baselines"].items():
            if n.startswith("full") and "latency_measured_ms" in o:
                ax.scatter([o["latency_measured_ms"]], [o["quality"]], s=80, marker="*",
                           c="k" if n == "full-float" else "C1", label=f"{n} (measured)", zorder=5)
        ax.set_xlabel(f"latency (ms, batch {VIT_BATCH if part == 'vit' else BATCH}): fronts MEASURED; faint points: "
                      "candidates at their PREDICTED latency", fontsize=7)
        ax.set_ylabel(r["model"]["quality"].split(" ")[0])
        ax.set_title(r["model"]["name"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None):  # noqa: ANN201
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--budget", type=int, default=12, help="real evaluations per method on the ViT")
    parser.add_argument("--minilm-budget", type=int, default=12, help="real evaluations per method on MiniLM")
    parser.add_argument("--batch", type=int, default=8, help="LINAS batch (candidates measured per round)")
    parser.add_argument("--generations", type=int, default=30, help="NSGA-II generations on the predictors")
    parser.add_argument("--pop-size", type=int, default=40)
    parser.add_argument("--n-eval", type=int, default=300, help="held-out digits scoring ViT accuracy")
    parser.add_argument("--minilm-eval", type=int, default=48, help="held-out sentences scoring MiniLM fidelity")
    parser.add_argument("--hidden-weight", type=float, default=1.0,
                        help="InstaTune's hidden-state distillation weight (the largest's blocks against the original's)")
    parser.add_argument("--reconstruct-target", choices=("stream", "layer"), default="stream")
    parser.add_argument("--reconstruct-samples", type=int, default=512, help="train-split samples added to every refit")
    parser.add_argument("--vit-tune-steps", type=int, default=500, help="InstaTune steps on the ViT (~0.25 s each)")
    parser.add_argument("--vit-tune-lr", type=float, default=3e-4)
    parser.add_argument("--minilm-tune-steps", type=int, default=150, help="InstaTune steps on MiniLM (~2.5 s each)")
    parser.add_argument("--minilm-tune-lr", type=float, default=1e-4, help="3e-4 moved the largest to 0.943 fidelity")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the confirming measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 evaluations, tiny fine-tuning")
    parser.add_argument("--out", type=Path, default=RESULTS / "search.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget, args.minilm_budget, args.batch, args.generations, args.pop_size = 8, 8, 4, 8, 16
        args.n_eval, args.minilm_eval, args.vit_tune_steps, args.minilm_tune_steps, args.rounds = 100, 16, 4, 2, 1
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from modelpress.progress import Reporter

    con = console()
    started = time.perf_counter()
    results, _ = previous_results("search", args.out)  # dynast reads the vit part's hypervolumes
    runners = {"vit": run_vit, "minilm": run_minilm, "dynast": lambda a, t, r: run_dynast(a, t, r, results)}
    results, path = run_parts("search", "search.py", argv, args, runners, threads=THREADS, reporter=Reporter(),
                              dists=("pymoo", "scikit-learn", "onnxruntime", "torch"), results=results)
    print_tables(con, results)
    png = plot(results, args.out.with_suffix(".png"))
    con.print(f"wrote {path}" + (f" and {png}" if png else " (no matplotlib: no plot)")
              + f" in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
