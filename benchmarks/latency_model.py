"""How well the latency model predicts pruned models: predicted against measured ms, all timed interleaved.

- ``minilm``: all-MiniLM-L6-v2 on ort-cpu, 2 threads, batch 1, sequence 128. ``pruned`` = ``prune.global``
  (Hessian saliency, heads and MLP units, to 0.5 of the MACs: about half the blocks' parameters, 0.76 of
  all with the embeddings, kept non-uniformly per block); ``further`` = ``pruned`` taken on to 0.7 of its
  own MACs (magnitude saliency). Two tables on one small
  grid recipe (heads 1/4, 1/2, all; the full head dim; MLP 1/8, 1/2, all; the model's embedding width):
  ``on_original`` (built on the unpruned model: all main's latency.py could build) and ``on_pruned`` (built on
  ``pruned`` itself: new; main refused a model whose blocks differ). ``--before FILE`` also builds
  ``on_original`` with another latency.py (``git show main:src/modelpress/bench/latency.py > FILE``).
- ``cnn``: the zoo's digits CNN at batch 64, 2 threads: a table on the CNN (conv channels only), predicting
  the CNN with every conv group at half its channels and an uneven cut. main's latency model had no table
  for a CNN (conv channels cost 0: a predicted speedup of 1.0).

Every model is exported the same way (torch.onnx, no graph optimizer) and timed in ONE interleaved run per
part (fresh sessions per round, medians of per-round ratios). Writes benchmarks/results/latency_model.json.
About 3-5 minutes on 2 cores; a busy machine makes every number noisier (the JSON records the load).

    python benchmarks/latency_model.py [--parts minilm,cnn] [--before /tmp/latency_main.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, console  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

THREADS, SEQ = 2, 128
CNN_BATCH = 64
OUT = RESULTS / "latency_model.json"


def _grid(graph) -> dict[str, list[int]]:  # noqa: ANN001
    from modelpress.bench.latency import table_key

    a = table_key(graph)["architecture"]
    q = a["heads_per_unit"]
    return {"heads": sorted({q, max(q, a["heads"] // 2 // q * q), a["heads"]}), "head_dim": [a["head_dim"]],
            "mlp": sorted({max(1, a["mlp"] // 8), a["mlp"] // 2, a["mlp"]}), "embed": [a["embed"]]}


def _timed(graphs: dict, target, batch: int, seq: int | None, tmp: Path, rounds: int = 5) -> dict[str, dict]:  # noqa: ANN001
    """Export every graph the tables' way and time them interleaved; per graph median ms and speedup over the first."""
    from modelpress.bench import measure
    from modelpress.export.onnx import export_onnx

    files = {n: export_onnx(g.module, g.input_spec, tmp / f"{n}.onnx", optimize="none").path for n, g in graphs.items()}
    first = next(iter(graphs))
    report = measure(files, graphs[first].input_spec, target, rounds=rounds, runs=10, min_time_s=0.3, warmup=3,
                     batch_sizes=[batch], seq_lens=[seq] if seq else None, memory=False, baseline=first)
    out = {}
    for n in graphs:
        s = report.stats(n, batch)
        out[n] = {"measured_ms": s.median_ms, "measured_speedup_vs_first": s.speedup or 1.0,
                  "speedup_rounds": s.speedup_rounds}
    return out


def _rows(table, graphs: dict, measured: dict, base: str) -> dict[str, Any]:  # noqa: ANN001
    """Per graph: predicted and measured ms, and speedups over ``base`` (the model the table was built on)."""
    pred = {n: float(table.predict(g)) for n, g in graphs.items()}
    m_base = measured[base]["measured_speedup_vs_first"]
    rows = {}
    for n in graphs:
        p_speed = pred[base] / pred[n]
        m_speed = measured[n]["measured_speedup_vs_first"] / m_base
        rows[n] = {"predicted_ms": round(pred[n], 3), "measured_ms": round(measured[n]["measured_ms"], 3),
                   "ms_error": round(pred[n] / measured[n]["measured_ms"] - 1, 4),
                   "predicted_speedup": round(p_speed, 4), "measured_speedup": round(m_speed, 4),
                   "speedup_error": round(p_speed / m_speed - 1, 4)}
    return rows


def run_minilm(args, tmp: Path, con) -> dict[str, Any]:  # noqa: ANN001
    import modelpress
    from modelpress.bench import build_latency_table, get_target
    from modelpress.data import EmbeddingTask, load_data
    from modelpress.passes import Context, registered_passes

    target = get_target("ort-cpu", THREADS)
    original = modelpress.load()
    data = load_data(None, original.input_spec, original.tokenizer, n_evaluation=64, max_length=SEQ)
    ctx = Context(workdir=tmp / "minilm", task=EmbeddingTask(), data=data, reference=original, seed=0)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    cls = registered_passes()["prune.global"]
    cfg = {"saliency": "hessian", "target": "macs", "kinds": ["head", "mlp"], "iterations": 1, "batches": 2}
    further_cfg = {**cfg, "saliency": "magnitude"}
    t0 = time.perf_counter()
    pruned = cls(cls.Config(**cfg, ratio=0.5)).apply(original, ctx).graph
    further = cls(cls.Config(**further_cfg, ratio=0.7)).apply(pruned, ctx).graph
    graphs = {"original": original, "pruned": pruned, "further": further}
    con.print(f"pruned in {time.perf_counter() - t0:.0f} s; widths {_widths(pruned)} -> {_widths(further)}")
    tables: dict[str, Any] = {}
    builds = [("on_original", build_latency_table, original), ("on_pruned", build_latency_table, pruned)]
    if args.before:
        spec = importlib.util.spec_from_file_location("latency_before", args.before)
        before = sys.modules["latency_before"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        builds.insert(0, ("on_original_before", before.build_latency_table, original))
    for name, build, graph in builds:
        t0 = time.perf_counter()
        tables[name] = build(graph, target, batch=1, seq=SEQ, grid=_grid(graph), cache=False)
        con.print(f"table {name}: {time.perf_counter() - t0:.0f} s")
    measured = _timed(graphs, target, 1, SEQ, tmp)
    result: dict[str, Any] = {"params": {n: g.num_parameters() for n, g in graphs.items()},
                              "widths": {n: _widths(g) for n, g in graphs.items()},
                              "prune": {"pruned": {**cfg, "ratio": 0.5}, "further": {**further_cfg, "ratio": 0.7}},
                              "tables": {}}
    for name, table in tables.items():
        base = "pruned" if name == "on_pruned" else "original"
        use = {n: g for n, g in graphs.items() if not (base == "pruned" and n == "original")}
        result["tables"][name] = {"built_on": base, "grid": table.axes, "seconds": round(table.seconds, 1),
                                  "notes": table.notes, "rows": _rows(table, use, measured, base)}
        # the same question for every table: how much faster is ``further`` than ``pruned``
        result["tables"][name]["further_vs_pruned"] = _rows(
            table, {"pruned": pruned, "further": further}, measured, "pruned")["further"]
    return result


def run_cnn(args, tmp: Path, con) -> dict[str, Any]:  # noqa: ANN001
    from modelpress.bench import build_latency_table, get_target
    from modelpress.graph.model_graph import ModelGraph
    from modelpress.train.zoo import digits_cnn

    z = digits_cnn()
    g = ModelGraph(z.module, z.input_spec, {"kind": "zoo", "class": "DigitsCNN"}, name="digits_cnn")
    target = get_target("ort-cpu", THREADS)
    half = g.copy()
    half.remove_many([("conv", list(range(16, 32))), ("conv#1", list(range(32, 64)))])
    uneven = g.copy()
    uneven.remove_many([("conv", list(range(8, 32))), ("conv#1", list(range(48, 64)))])
    graphs = {"full": g, "half": half, "uneven": uneven}
    t0 = time.perf_counter()
    table = build_latency_table(g, target, batch=CNN_BATCH, cache=False)
    con.print(f"table on the digits CNN: {time.perf_counter() - t0:.0f} s")
    measured = _timed(graphs, target, CNN_BATCH, None, tmp)
    rows = _rows(table, graphs, measured, "full")
    return {"batch": CNN_BATCH, "channels": {n: {k.name: k.size for k in x.groups_of_kind("conv", prunable_only=False)}
                                              for n, x in graphs.items()},
            "table": {"seconds": round(table.seconds, 1), "notes": table.notes, "coef": table.conv["coef"],
                      "fit_residual": table.conv["residual"], "rows": rows},
            "before": "main: no latency table for a model without transformer blocks (conv channels cost 0, "
                      "predicted speedup 1.0 for every channel cut)"}


def _widths(graph) -> list:  # noqa: ANN001
    from modelpress.bench.latency import graph_widths

    return [[b["heads"], b["mlp"]] for b in graph_widths(graph)[0]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="minilm,cnn")
    p.add_argument("--before", help="another latency.py (e.g. main's) to build the on_original table with too")
    args = p.parse_args(argv)
    import torch

    from modelpress.bench import write_json_atomic
    from modelpress.system import load_average, system_info

    torch.set_num_threads(1)
    con = console()
    out: dict[str, Any] = {"system": system_info(THREADS), "load_average_1min": [load_average()],
                           "protocol": "tables and timings on ort-cpu, 2 threads; all models of a part timed in one "
                                       "interleaved run (5 rounds, fresh sessions); machine shared by other jobs"}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mp-latency-model-") as tmp:
        for part in args.parts.split(","):
            con.print(f"[bold]{part}[/bold]")
            fn = {"minilm": run_minilm, "cnn": run_cnn}[part]
            (Path(tmp) / part).mkdir(parents=True, exist_ok=True)
            out[part] = fn(args, Path(tmp) / part, con)
    out["load_average_1min"].append(load_average())
    out["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(OUT, out)
    for part in ("minilm", "cnn"):
        if part in out:
            tables = out[part]["tables"] if part == "minilm" else {"cnn": out[part]["table"]}
            for name, t in tables.items():
                for n, r in t["rows"].items():
                    con.print(f"{part} {name:20s} {n:9s} pred {r['predicted_ms']:8.3f} ms  meas {r['measured_ms']:8.3f} ms"
                              f"  speedup pred {r['predicted_speedup']:.3f} meas {r['measured_speedup']:.3f}"
                              f"  err {r['speedup_error']:+.1%}")
    con.print(f"wrote {OUT} ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
