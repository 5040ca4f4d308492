"""Block removal on the small trained causal LM: direct removal by Block Influence, one-shot KL and Macro
Influence, MI + LaCo-style merge, and FuseGPT (MI + learnable fusion), at 25% and 37.5% of the blocks.

The model, tokenizer, corpus splits, calibration and evaluation windows are the language-model benchmark's
(``benchmarks/language_model.py``: a 4-block GPT-2 trained on CPython's help topics, cached). Every variant is
``prune.fuse_blocks`` with one importance and one fusion. Not yet here: direct removal + plain recovery with
FuseGPT's fine-tuning budget (``ctx.recover`` on these windows failed with a position index out of range).
Quality: next-token KL, top-1 agreement and perplexity in ONNX Runtime against the FP32 torch model
(``ctx.evaluate``); latency: all ONNX files timed interleaved (``ctx.measure``), speedups against ``fp32``.

    python benchmarks/block_pruning.py            # the full run
    python benchmarks/block_pruning.py --quick    # a smoke run (short training, 1 round, 32 windows)

Written to benchmarks/results/block_pruning.json. Only MiniLM/ViT and INT8-on-top are not covered yet.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, console, parse_timing_args, quiet, timing_kwargs, timing_parser  # noqa: E402

FRACTIONS = (0.25, 0.375)
FINETUNE_STEPS = 20
VARIANTS: dict[str, dict[str, Any]] = {
    "bi": {"importance": "block-influence", "fusion": "none"},
    "kl": {"importance": "kl", "fusion": "none"},
    "mi": {"importance": "mi", "fusion": "none"},
    "mi-merge": {"importance": "mi", "fusion": "merge"},
    "fusegpt": {"importance": "mi", "fusion": "learned", "finetune_steps": FINETUNE_STEPS},
}


def run(args, tmp: Path, reporter) -> dict[str, Any]:  # noqa: ANN001
    import language_model as lm

    import modelpress
    from modelpress.bench import get_target
    from modelpress.data import LanguageModelTask, TaskData
    from modelpress.passes import Context
    from modelpress.prune.blocks.pass_ import FuseBlocks

    splits = lm.corpus_splits()
    steps = lm.TRAIN_STEPS_QUICK if args.quick else lm.TRAIN_STEPS
    trained = lm.trained_model(splits, steps, reporter)
    with quiet():
        graph = modelpress.load(trained["folder"])
    tok = graph.tokenizer
    n_eval = lm.N_EVALUATION_QUICK if args.quick else lm.N_EVALUATION
    calibration = lm.windows(tok, splits["calibration"])[: lm.N_CALIBRATION]
    evaluation = lm.windows(tok, splits["evaluation"])[:n_eval]
    data = TaskData(calibration=lm.split_of(calibration), evaluation=lm.split_of(evaluation),
                    description=f"{lm.CORPUS}: the language-model benchmark's windows")
    ctx = Context(workdir=tmp, task=LanguageModelTask(), data=data,
                  target=get_target("ort-cpu", threads=lm.THREADS), reference=graph, seed=lm.SEED, reporter=reporter)
    files: dict[str, Any] = {"fp32": graph}
    results: dict[str, Any] = {"fp32": {"quality": ctx.evaluate(graph).metrics}}
    for fraction in FRACTIONS:
        for name, options in VARIANTS.items():
            key = f"{name}@{fraction}"
            t0 = time.perf_counter()
            with quiet():
                res = FuseBlocks({"target_blocks": fraction, **options}).apply(graph, ctx)
                g = res.graph
                quality = ctx.evaluate(g).metrics
            results[key] = {"options": options, "removed": res.metrics["removed_blocks"], "quality": quality,
                            "seconds": round(time.perf_counter() - t0, 1),
                            "params": res.metrics["params_after"]}
            files[key] = g
            reporter.log(f"{key}: removed {res.metrics['removed_blocks']} kl {quality.get('next_token_kl'):.4f}")
    with quiet():
        bench = ctx.measure(files, baseline="fp32", **timing_kwargs(args))
    for name, row in bench.to_dict().get("variants", {}).items():
        if name in results:
            results[name]["latency"] = row
    return {"variants": results, "trained": trained}


def main(argv: list[str] | None = None) -> int:
    parser = timing_parser(__doc__, RESULTS / "block_pruning.json", runs=20, min_time=0.5, threads=False)
    args = parse_timing_args(parser, argv)
    from modelpress.bench import system_info, write_json_atomic
    from modelpress.progress import Reporter

    con = console()
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "block_pruning", "quick": args.quick, "system": system_info()}
    with tempfile.TemporaryDirectory(prefix="modelpress-block-pruning-") as tmp:
        result.update(run(args, Path(tmp), Reporter()))
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = write_json_atomic(args.out, result)
    for name, row in result["variants"].items():
        q = row["quality"]
        con.print(f"{name:22s} kl {q.get('next_token_kl', float('nan')):.4f}  top1 {q.get('top1_agreement', 0):.3f}  "
                  f"ppl {q.get('perplexity', float('nan')):.2f}")
    con.print(f"wrote {out} ({result['seconds']:.0f} s{', QUICK: smoke numbers' if args.quick else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
