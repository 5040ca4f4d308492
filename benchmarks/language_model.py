"""A small causal LM, compressed by the default recipe, ONNX Runtime dynamic INT8 and NNCF in one run.

Speedup, size, next-token KL, top-1 agreement and perplexity for each, timed interleaved.

Written to benchmarks/results/language_model.json (with the system info).

**Corpus** (offline, no download): the English text of CPython's own documentation topics,
``pydoc_data.topics`` (the standard library's ``help()`` texts, about 0.5 MB of English prose with code
examples; Python Software Foundation License). The topics (79 in CPython 3.11, two of which share one text, kept
once) are split *by topic* (a seeded shuffle, then filled to a share of the characters: about 12%
evaluation, 13% calibration, 75% train): held-out evaluation, calibration and train share no text. The tokenizer and the model see only the train topics.

**Model**: a byte-level BPE (``tokenizers``, vocabulary 2048) trained on the train topics, and a
GPT-2 (``transformers.GPT2LMHeadModel``: 4 blocks, hidden 128, 4 heads, 128 positions) trained from
scratch with ``modelpress.train.train`` (next-token cross-entropy, 200 steps of 8 windows, AdamW,
cosine schedule, seeded; ``--train-steps`` changes the budget). Both
are cached as a Hugging Face folder under ``$MODELPRESS_CACHE`` (default ~/.cache/modelpress), keyed by
this benchmark's model version, the seed, the step budget and a hash of the corpus and training settings,
so a re-run skips training.

**Variants** (every ONNX file is built first, then all are timed interleaved):

- ``fp32``: ``export_onnx(optimize="none")`` of the trained model (opset 17),
- ``ours``: the built-in ``default`` recipe: ``quantize.repq`` with its options, lowered by the pass's own
  exporter (QDQ, integer kernels) through ``ctx.export``,
- ``ort-dynamic``: ``quantize.ort-dynamic`` (onnxruntime quantize_dynamic) on the FP32 file,
- ``nncf``: ``quantize.nncf`` (nncf.quantize, transformer model type) on the FP32 file; skipped with a
  reason when nncf is not installed or with ``--no-nncf``.

Calibration: the calibration topics' 128-token windows; evaluation: the held-out topics' windows. Quality
(``modelpress.data.LanguageModelTask`` through ``ctx.evaluate``, in ONNX Runtime, against the FP32 torch
model): next-token KL, top-1 agreement, perplexity of the held-out text (and the reference's). Latency:
``modelpress.bench.measure`` on ort-cpu at 2 threads, batch 1 and 8, sequence 128, round-robin with fresh
sessions every round; speedups are medians of per-round ratios against ``fp32``.

    python benchmarks/language_model.py            # the full run (trains once: a few minutes on 2 cores)
    python benchmarks/language_model.py --quick    # a smoke run (short training, 1 round, 32 windows)

**--llama: generation peers on a real small LM** (``results/language_model_llama.json``). The model is
``modelpress.train.stdlib_llama()``: a 22.3M-parameter Llama (grouped-query attention 8/2, rotary, tied head)
trained once (cached) on this Python's standard-library ``.py`` sources (PSF licence), split by file. Every
variant is a cached decoder (prefill and decode in one graph): ``fp32`` (our export, fused attention), ``fp32-plain`` (plain attention ops), ``ours-w8a8`` (recipe
default, traced with its cache as fake-quant), ``ours-int4`` (recipe int4-weight-only, MatMulNBits in the
decoder), ``ort-rtn`` (ONNX Runtime's MatMulNBitsQuantizer on our FP32 decoder; needs ``onnx-ir``:
``pip install 'modelpress[ort-int4]'``), ``genai-int4`` (onnxruntime-genai's model builder, ``-p int4 -e
cpu``, offline from the same folder), ``nncf-int4`` (NNCF ``compress_weights`` INT4 with AWQ + scale
estimation, ONNX backend, on our FP32 decoder; when nncf is installed) and ``llama-cpp-q4km`` (llama.cpp Q4_K_M
through ``llama-cpp-python``, when it is installed and ``--llama-cpp-src`` names the sdist's ``vendor/llama.cpp``
for its HF->GGUF converter; else skipped with the reason). Quality: each decoder run as a prefill on
held-out 128-token windows of the evaluation files, KL / top-1 against the FP32 torch model, perplexity;
speed: ``bench.generation.measure_generation`` at batch 1 (prefill at prompt 128, decode tokens/s), interleaved
(llama.cpp: its own API in the same process right after the ORT rounds, so not interleaved). ``--quick`` runs
every row on fewer windows (8 calibration windows for W8A8, INT4 and NNCF, 8 evaluation windows).

    python benchmarks/language_model.py --llama [--rounds N] [--no-w8a8] [--no-nncf] [--no-llama-cpp]
        [--llama-cpp-src DIR]
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    CACHE,
    RESULTS,
    console,
    dist_version,
    failure,
    fmt,
    parse_timing_args,
    quiet,
    recipe_options,
    timing_kwargs,
    timing_parser,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_VERSION = 1  # bump when the corpus split, tokenizer or model configuration changes
SEED = 0
SEQ = 128
VOCAB = 2048
MODEL = {"n_layer": 4, "n_embd": 128, "n_head": 4}
TRAIN_STEPS, TRAIN_STEPS_QUICK = 200, 20
TRAIN_BATCH, TRAIN_LR = 8, 2e-3
EVAL_SHARE, CALIBRATION_SHARE = 0.12, 0.08  # of the corpus's characters, by whole topics
N_CALIBRATION = 64
N_EVALUATION, N_EVALUATION_QUICK = 160, 32
BATCHES = [1, 8]
THREADS = 2
BASELINE, OURS = "fp32", "ours"
PEERS = ("ort-dynamic", "nncf")
CORPUS = (
    "CPython documentation topics (pydoc_data.topics, the text of help() in the Python standard library), "
    "Python Software Foundation License; split by topic into disjoint train / calibration / evaluation"
)
DESCRIPTIONS = {
    BASELINE: "FP32, export_onnx(optimize='none'), opset 17",
    OURS: "recipe default: quantize.repq W8A8 (reparameterized per-channel scales at the norms and the Linear "
    "inputs a fidelity scan picks, MSE activation ranges, GPTQ), exported by the pass's QDQ lowering",
    "ort-dynamic": "quantize.ort-dynamic: onnxruntime quantize_dynamic on the FP32 file (int8 weights, "
    "activations quantized at run time)",
    "nncf": "quantize.nncf: nncf.quantize on the FP32 file, model_type TRANSFORMER",
}


# ------------------------------------------------------------------------------------------------ corpus


def corpus_splits(seed: int = SEED) -> dict[str, list[str]]:
    """The documentation topics split by topic into ``train``, ``calibration`` and ``evaluation`` texts.

    The distinct topic texts are shuffled with ``seed`` and taken in that order until the evaluation, then
    the calibration split hold their share of the characters; the rest is train. No text is in two splits.
    """
    from pydoc_data.topics import topics

    texts = sorted({text.strip() for text in topics.values()})  # a few topics share one text: keep it once
    random.Random(seed).shuffle(texts)
    total = sum(map(len, texts))
    splits: dict[str, list[str]] = {"evaluation": [], "calibration": [], "train": []}
    filled = {"evaluation": 0, "calibration": 0}
    for text in texts:
        if filled["evaluation"] < EVAL_SHARE * total:
            key = "evaluation"
        elif filled["calibration"] < CALIBRATION_SHARE * total:
            key = "calibration"
        else:
            key = "train"
        if key in filled:
            filled[key] += len(text)
        splits[key].append(text)
    return splits


def windows(tokenizer, texts: list[str], seq: int = SEQ):  # noqa: ANN001, ANN201 - torch.LongTensor [N, seq]
    """The texts tokenized, joined by the end-of-text token, cut into non-overlapping ``seq``-token windows."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(eos)
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq], dtype=torch.long).reshape(n, seq)


def split_of(rows, batch_size: int = 8):  # noqa: ANN001, ANN201 - DataSplit
    """Windows as a DataSplit of input_ids with a full attention mask."""
    import torch

    from modelpress.data import DataSplit

    batches = [
        {"input_ids": rows[i : i + batch_size], "attention_mask": torch.ones_like(rows[i : i + batch_size])}
        for i in range(0, len(rows), batch_size)
    ]
    return DataSplit(batches=batches)


# ------------------------------------------------------------------------------------------------- model


def _train_tokenizer(texts: list[str]):  # noqa: ANN202 - PreTrainedTokenizerFast
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def corpus_fingerprint(splits: dict[str, list[str]]) -> str:
    """A short hash of the split texts (another Python's documentation gives another corpus)."""
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()[:12]


def model_dir(splits: dict[str, list[str]], steps: int, seed: int = SEED) -> Path:
    """Where the trained model and tokenizer are cached: keyed by the model version, the seed, the steps and
    a hash of the corpus splits and the training settings, so a changed recipe never reuses a stale model."""
    settings = json.dumps([MODEL, VOCAB, SEQ, TRAIN_BATCH, TRAIN_LR, corpus_fingerprint(splits)])
    key = hashlib.sha256(settings.encode()).hexdigest()[:8]
    return CACHE / "benchmarks" / f"language-model-v{MODEL_VERSION}-seed{seed}-steps{steps}-{key}"


def trained_model(splits: dict[str, list[str]], steps: int, reporter, seed: int = SEED) -> dict[str, Any]:  # noqa: ANN001
    """Train (or load from the cache) the tokenizer and the GPT-2; returns the folder and how it was made."""
    import torch
    import transformers

    from modelpress.data import LanguageModelTask
    from modelpress.train import TrainConfig, train

    folder = model_dir(splits, steps, seed)
    info_file = folder / "modelpress-benchmark.json"
    if info_file.exists():
        reporter.log(f"trained model from the cache: {folder}")
        return {**json.loads(info_file.read_text()), "cached": True}
    with reporter.step("BPE tokenizer on the train topics"):
        tokenizer = _train_tokenizer(splits["train"])
    train_rows = windows(tokenizer, splits["train"])
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=SEQ, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, use_cache=False, **MODEL,
    )
    model = transformers.GPT2LMHeadModel(config)
    cfg = TrainConfig(
        steps=steps, lr=TRAIN_LR, batch_size=TRAIN_BATCH, warmup_steps=min(50, steps // 10), seed=seed,
        label_weight=0.0, log_every=max(1, steps // 10),
    )
    with reporter.step(f"training the GPT-2 ({steps} steps, {len(train_rows)} windows of {SEQ} tokens)"):
        result = train(model, split_of(train_rows, TRAIN_BATCH), task=LanguageModelTask(), teacher=None,
                       config=cfg, input_names=["input_ids", "attention_mask"], reporter=reporter)
    partial = folder.with_name(folder.name + ".partial")
    with quiet():  # transformers' progress bar
        model.eval().save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    info = {
        "folder": str(folder),
        "config": {**MODEL, "vocab_size": len(tokenizer), "n_positions": SEQ},
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_windows": len(train_rows),
        "train_tokens": int(train_rows.numel()),
        "train": {**cfg.model_dump(mode="json"), "steps_run": result.steps, "seconds": round(result.seconds, 1),
                  "final_loss": round(result.final_loss, 4), "losses": result.losses},
        "torch_threads": torch.get_num_threads(),
    }
    (partial / info_file.name).write_text(json.dumps(info, indent=1) + "\n")
    if folder.exists():  # another run finished first: keep its copy
        import shutil

        shutil.rmtree(partial)
    else:
        partial.replace(folder)
    return {**info, "cached": False}


# --------------------------------------------------------------------------------------------- benchmark


def run(args, tmp: Path, reporter) -> dict[str, Any]:  # noqa: ANN001, C901
    import modelpress
    from modelpress.bench import get_target, measure
    from modelpress.data import LanguageModelTask, TaskData
    from modelpress.export import export_onnx
    from modelpress.export.files import onnx_file_size
    from modelpress.passes import Context
    from modelpress.quantize.ort_dynamic import OrtDynamicInt8
    from modelpress.quantize.passes import NNCFQuantize, RepQPass

    started = time.perf_counter()
    splits = corpus_splits()
    steps = args.train_steps or (TRAIN_STEPS_QUICK if args.quick else TRAIN_STEPS)
    trained = trained_model(splits, steps, reporter)
    with reporter.step("loading the trained model"), quiet():
        graph = modelpress.load(trained["folder"])
    spec = graph.input_spec
    tokenizer = graph.tokenizer
    n_eval = N_EVALUATION_QUICK if args.quick else N_EVALUATION
    calibration = windows(tokenizer, splits["calibration"])[:N_CALIBRATION]
    evaluation = windows(tokenizer, splits["evaluation"])[:n_eval]
    data = TaskData(
        calibration=split_of(calibration),
        evaluation=split_of(evaluation),
        description=f"{CORPUS}: {len(calibration)} calibration and {len(evaluation)} evaluation windows of "
        f"{SEQ} tokens",
    )
    task = LanguageModelTask()
    ctx = Context(workdir=tmp / "ctx", task=task, data=data, target=get_target("ort-cpu", threads=THREADS),
                  reference=graph, seed=SEED, reporter=reporter)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    with reporter.step("reference next-token distributions (torch FP32)"):
        ctx.reference_outputs()

    info: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    with reporter.step("FP32 export"), quiet():
        exported = export_onnx(graph.module, spec, tmp / BASELINE / "model.onnx", optimize="none")
    paths[BASELINE] = Path(exported.path)
    info[BASELINE] = {"status": "ok", "export_seconds": round(exported.export_seconds, 2)}

    options = recipe_options("default")
    repq = RepQPass(options)
    with reporter.step(f"{OURS}: quantize.repq {options}"), quiet():
        t0 = time.perf_counter()
        result = repq.apply(graph, ctx)
        seconds = time.perf_counter() - t0
    path = tmp / OURS / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with reporter.step(f"{OURS}: export through the pass's lowering"), quiet():
        exported_q = ctx.export(result.graph, path, exporter=result.exporter)
    paths[OURS] = Path(exported_q.path)
    verification = getattr(exported_q, "verification", None)
    info[OURS] = {
        "status": "ok",
        "config": {"options_given": options, "quantize.repq": repq.config.model_dump(mode="json")},
        "calibration_seconds": round(seconds, 2),
        "export_seconds": round(getattr(exported_q, "export_seconds", 0.0), 2),
        "qdq_vs_torch_fake_quant": _plain(verification),
        "channel_sites": (result.metrics.get("channel_sites") or {}).get("sites", []),
        "kept_float": (result.metrics.get("auto_float") or {}).get("kept_float", []),
        "layers": result.metrics.get("layers"),
    }

    peers: list[tuple[str, Any]] = [("ort-dynamic", OrtDynamicInt8({}))]
    if args.no_nncf:
        info["nncf"] = {"status": "skipped", "reason": "--no-nncf"}
    elif dist_version("nncf") is None:
        info["nncf"] = {"status": "skipped", "reason": "nncf is not installed (pip install 'modelpress[nncf]')"}
    else:
        peers.append(("nncf", NNCFQuantize({"samples": len(calibration)})))
    for name, pass_ in peers:
        try:
            work = tmp / name
            work.mkdir(parents=True, exist_ok=True)
            peer_ctx = Context(workdir=work, data=data, seed=SEED, reporter=reporter)
            with reporter.step(f"{name}: {pass_.name}"), quiet():
                t0 = time.perf_counter()
                out = pass_.apply(paths[BASELINE], peer_ctx)
                seconds = time.perf_counter() - t0
        except Exception as exc:  # record why, measure the rest
            info[name] = failure(exc)
            reporter.log(f"[yellow]{name} failed:[/yellow] {exc}")
            continue
        paths[name] = Path(out.onnx_path)
        info[name] = {
            "status": "ok",
            "config": {pass_.name: pass_.config.model_dump(mode="json")},
            "calibration_seconds": round(seconds, 2),
        }

    for name, p in list(paths.items()):
        entry = info[name]
        entry["description"] = DESCRIPTIONS[name]
        entry["file_size_bytes"] = onnx_file_size(p)
        try:
            with reporter.step(f"quality of {name}"), quiet():
                entry["quality"] = {k: float(v) for k, v in ctx.evaluate(p).metrics.items()}
            entry.update(_kernels(p))
        except Exception as exc:
            if name in (BASELINE, OURS):
                raise
            info[name] = {**entry, **failure(exc)}
            paths.pop(name)
            reporter.log(f"[yellow]{name} does not run:[/yellow] {exc}")
    order = [BASELINE, OURS, *PEERS]
    info = {name: {"description": DESCRIPTIONS[name], **info[name]} for name in order if name in info}
    build_seconds = time.perf_counter() - started

    with reporter.step("latency (interleaved)"), quiet():
        report = measure(
            paths, spec, get_target("ort-cpu", threads=THREADS), **timing_kwargs(args), max_time_s=30.0,
            baseline=BASELINE, batch_sizes=BATCHES, seq_lens=[SEQ], memory=False, reporter=reporter,
        )
    for name, variant in report.variants.items():
        if variant.path:
            variant.path = f"{name}/{Path(variant.path).name}"
        lat = info[name].setdefault("latency", {})
        for b in BATCHES:
            s = report.stats(name, b, SEQ)
            lat[f"batch{b}"] = {
                "median_ms": round(s.median_ms, 3),
                "speedup_vs_fp32": None if s.speedup is None else round(s.speedup, 4),
            }
        info[name]["size_vs_fp32"] = round(info[name]["file_size_bytes"] / info[BASELINE]["file_size_bytes"], 4)

    return {
        "model": f"GPT2LMHeadModel trained from scratch by this benchmark ({MODEL['n_layer']} blocks, hidden "
        f"{MODEL['n_embd']}, {MODEL['n_head']} heads, {SEQ} positions, byte-level BPE vocabulary "
        f"{trained['config']['vocab_size']}, {trained['parameters']} parameters)",
        "corpus": CORPUS,
        "corpus_topics": {k: len(v) for k, v in splits.items()},
        "corpus_characters": {k: sum(map(len, v)) for k, v in splits.items()},
        "corpus_fingerprint": corpus_fingerprint(splits),
        "training": trained,
        "data": data.description,
        "uniform_perplexity": trained["config"]["vocab_size"],
        "protocol": (
            f"every variant built first; quality in ONNX Runtime ({THREADS} threads) on {len(evaluation)} "
            f"held-out windows of {SEQ} tokens against the FP32 torch model (LanguageModelTask: next-token KL, "
            "top-1 agreement, perplexity); latency: ort-cpu at "
            f"{THREADS} threads, batch {' and '.join(map(str, BATCHES))}, sequence {SEQ}, all variants "
            f"interleaved round-robin with fresh sessions every round, {args.rounds} rounds, warm-up, >= "
            f"{args.runs} runs and >= {args.min_time}s per variant, shape and round; medians of per-round "
            "medians; speedups are medians of per-round ratios against fp32"
        ),
        "variants": info,
        "measurements": report.to_dict(),
        "build_seconds": round(build_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _kernels(path: Path) -> dict[str, Any]:
    """The kernels ONNX Runtime runs for ``path`` (from its optimized graph) and how many are integer ones."""
    from modelpress.quantize.qdq import integer_kernel_count, ort_kernels

    k = ort_kernels(path, workdir=path.parent)
    return {"integer_kernels": integer_kernel_count(k), "kernels": dict(sorted(k.items()))}


def _plain(verification: Any) -> dict[str, Any] | None:
    """An export's verification (a dict from a lowering, or modelpress.export.Verification) as JSON."""
    if verification is None or isinstance(verification, dict):
        return verification
    import dataclasses

    return dataclasses.asdict(verification)


def print_table(con, res: dict[str, Any]) -> None:  # noqa: ANN001
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{res['model']}\nort-cpu, {THREADS} threads, sequence {SEQ} (speedup vs fp32; ms)")
    table.add_column("variant")
    for b in BATCHES:
        table.add_column(f"b{b}", justify="right")
    for col in ("file MB", "int kernels", "next-token KL", "top-1 agree", "perplexity"):
        table.add_column(col, justify="right")
    for name, e in res["variants"].items():
        if e.get("status") != "ok":
            table.add_row(name, *["-"] * (len(BATCHES) + 4), escape(f"{e.get('status')}: {e.get('reason', '')}"))
            continue
        lat = e.get("latency", {})
        cells = [
            f"{fmt(lat.get(f'batch{b}', {}).get('speedup_vs_fp32'), '.2f', 'x')} "
            f"({fmt(lat.get(f'batch{b}', {}).get('median_ms'), '.2f')})"
            for b in BATCHES
        ]
        q = e.get("quality", {})
        table.add_row(
            name, *cells, fmt(e["file_size_bytes"] / 1e6, ".2f"), fmt(e.get("integer_kernels"), "d"),
            fmt(q.get("next_token_kl"), ".2e"),
            fmt(q.get("top1_agreement"), ".4f"),
            f"{fmt(q.get('perplexity'), '.2f')} (ref {fmt(q.get('reference_perplexity'), '.2f')})",
        )
    con.print(table)


# ------------------------------------------------------------------------- the stdlib Llama, generation

LLAMA_SEQ = 128  # evaluation windows and the prompt of the generation timing
LLAMA_NEW_TOKENS = 32
LLAMA_EVAL, LLAMA_EVAL_QUICK = 48, 8
LLAMA_CALIBRATION_QUICK = 8  # --quick: every calibrated row (W8A8, INT4, NNCF) on this many windows
LLAMA_DESCRIPTIONS = {
    "fp32": "FP32 cached decoder (modelpress export_decoder: one graph, GenAI names, opset 17, fused attention: "
    "GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization)",
    "fp32-plain": "FP32 cached decoder with plain ONNX attention ops (export_decoder fused=False: the export before "
    "the fused attention, kept as a reference)",
    "ours-w8a8": "recipe default (quantize.repq W8A8) traced with its cache: fake-quant ops on float weights "
    "(the cached export has no integer-kernel lowering for W8A8 yet)",
    "ours-int4": "recipe int4-weight-only (quantize.weight_only: GPTQ act-order, block 32, asymmetric, head 8-bit "
    "tied) lowered to MatMulNBits in the cached decoder (q/k/v and gate/up packed, accuracy level 4 where it "
    "verifies) with the fused attention (GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization)",
    "ort-rtn": "onnxruntime MatMulNBitsQuantizer (default RTN, 4 bits, block 32, asymmetric, accuracy level 4) "
    "on our FP32 decoder (fused attention) after ORT's basic constant folding (which turns the transposed weights into "
    "initializers it can quantize)",
    "genai-int4": "onnxruntime-genai model builder, -p int4 -e cpu, from the same Hugging Face folder (its own "
    "graph: GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits)",
    "nncf-int4": "NNCF compress_weights (ONNX backend) on our FP32 decoder (fused attention) after ORT's basic "
    "constant folding and ORT's symbolic shape inference (NNCF's graph needs the contrib ops' shapes): INT4 "
    "asymmetric, group 32, ratio 1.0, AWQ + scale estimation on the calibration windows (batch 1 each), NNCF's "
    "default INT8 per-channel backup for the embedding and the tied LM head (DequantizeLinear); emitted as "
    "MatMulNBits (opset < 21); two edits for ONNX Runtime: its 4-bit zero points packed two per byte (NNCF 3.4 writes "
    "one per byte, which ONNX Runtime 1.32 refuses; lossless) and accuracy_level set from NNCF's 0 to 4 as in the "
    "ort-rtn row",
    "llama-cpp-q4km": "llama.cpp Q4_K_M through llama-cpp-python: the Hugging Face folder converted to an F32 GGUF by "
    "the converter vendored in the llama-cpp-python sdist (convert_hf_to_gguf.py + gguf-py; its tokenizer check "
    "does not know our byte-level BPE, so the vocabulary is written as GPT-2-style BPE: the benchmark feeds token "
    "ids), then llama_model_quantize Q4_K_M; its own runtime (not ONNX Runtime), timed in the same process right "
    "after the interleaved ORT rounds (not interleaved), 2 threads",
}


def _ort_folded(src: Path, dst: Path) -> Path:
    """``src`` after ONNX Runtime's basic graph optimizations (constant folding), saved at ``dst``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return dst


def _ort_rtn_decoder(fp32: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out.parent.mkdir(parents=True, exist_ok=True)
    folded = _ort_folded(fp32, out.with_name("folded.onnx"))
    q = MatMulNBitsQuantizer(onnx.load(str(folded)), bits=4, block_size=32, is_symmetric=False, accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    folded.unlink()
    return out


def _nncf_int4_decoder(fp32: Path, out: Path, rows, accuracy_level: int = 4) -> tuple[Path, dict[str, Any]]:  # noqa: ANN001
    """NNCF's data-aware INT4 (AWQ + scale estimation) of our FP32 cached decoder, through its ONNX backend.

    The decoder is constant-folded by ORT (transposed weights become initializers) and shape-inferred by ORT's
    symbolic shape inference: without the contrib ops' output shapes NNCF's graph has no edge into the q/k/v
    MatMuls. ``rows`` (calibration windows) are fed one window at a time with an empty cache."""
    from collections import Counter

    import nncf
    import numpy as np
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from modelpress.bench.generation import layout_from_onnx
    from modelpress.export.decoder import positions

    out.parent.mkdir(parents=True, exist_ok=True)
    layout = layout_from_onnx(fp32)
    folded = _ort_folded(fp32, out.with_name("folded.onnx"))
    model = SymbolicShapeInference.infer_shapes(onnx.load(str(folded)), auto_merge=True)
    folded.unlink()

    def feed(row) -> dict[str, Any]:  # noqa: ANN001
        ids = row[None].numpy()
        mask = np.ones_like(ids)
        extra = {"position_ids": positions(mask, ids.shape[1])} if layout.position_ids else {}
        return {"input_ids": ids, "attention_mask": mask, **extra, **layout.empty_past(1)}

    config = {"mode": "int4_asym", "group_size": 32, "ratio": 1.0, "awq": True, "scale_estimation": True,
              "subset_size": len(rows), "accuracy_level": accuracy_level}
    t0 = time.perf_counter()
    with quiet():
        q = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=32, ratio=1.0,
                                  dataset=nncf.Dataset([feed(r) for r in rows]), awq=True, scale_estimation=True,
                                  subset_size=len(rows))
    seconds = time.perf_counter() - t0
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    if not nbits:
        raise RuntimeError("NNCF wrote no MatMulNBits: " + str(Counter(n.op_type for n in q.graph.node)))
    packed = _pack_nncf_zero_points(q, nbits)
    for node in nbits:  # NNCF writes accuracy_level 0 (float compute): 8x slower per step here (see 22's note)
        for attr in node.attribute:
            if attr.name == "accuracy_level":
                attr.i = accuracy_level
    del q.graph.value_info[:]
    onnx.save(q, str(out))
    return out, {"config": config, "nncf_seconds": round(seconds, 1), "zero_points_packed": packed,
                 "ops": dict(Counter(n.op_type for n in q.graph.node).most_common(8))}


def _pack_nncf_zero_points(model, nodes) -> int:  # noqa: ANN001
    """NNCF 3.4 writes MatMulNBits' 4-bit zero points one per byte ([N, blocks]); ONNX Runtime 1.32 takes them
    two per byte ([N, ceil(blocks / 2)], the even block in the low nibble) and refuses the session otherwise
    ("zero_points initializer shape ... does not match"). Packs them in place (lossless); how many were packed."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for node in nodes:
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("bits") != 4 or len(node.input) < 4 or node.input[3] not in inits:
            continue
        blocks = -(-attrs["K"] // attrs["block_size"])
        zp = numpy_helper.to_array(inits[node.input[3]])
        if zp.dtype != np.uint8 or zp.size != attrs["N"] * blocks:
            continue  # already packed (or float zero points)
        zp = zp.reshape(attrs["N"], blocks)
        if blocks % 2:
            zp = np.concatenate([zp, np.zeros((attrs["N"], 1), np.uint8)], axis=1)
        inits[node.input[3]].CopyFrom(numpy_helper.from_array((zp[:, 0::2] & 0x0F) | (zp[:, 1::2] << 4),
                                                              node.input[3]))
        done += 1
    return done


def _quantized_verification(path: Path, module, new_tokens: int) -> dict[str, Any]:  # noqa: ANN001
    """A quantized decoder run by ONNX Runtime through its cache, checked two ways: its cached greedy tokens
    against its own uncached full-sequence forward (the cache is right: tokens must agree, logits close), and
    against the FP32 torch model's greedy tokens (how far quantization moves generation; reported only)."""
    import numpy as np

    from modelpress.bench.generation import layout_from_onnx
    from modelpress.export.decoder import greedy_onnx, held_out_prompts, positions, torch_greedy
    from modelpress.targets import cpu_session

    layout = layout_from_onnx(path)
    ids, mask = held_out_prompts(layout, new_tokens)
    session = cpu_session(path)
    got, step_logits = greedy_onnx(session, layout, ids, mask, new_tokens)
    full_ids = np.concatenate([ids, got[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(got[:, :-1])], axis=1)
    feed = {"input_ids": full_ids, "attention_mask": full_mask, **layout.empty_past(len(ids))}
    if layout.position_ids:
        feed["position_ids"] = positions(full_mask, full_ids.shape[1])
    wanted = {i.name for i in session.get_inputs()}
    full = session.run(["logits"], {k: v for k, v in feed.items() if k in wanted})[0]
    cached = np.concatenate(step_logits, axis=1)
    valid = full_mask.astype(bool)
    uncached_tokens = full[:, ids.shape[1] - 1:].argmax(-1)
    reference = torch_greedy(module, ids, mask, new_tokens)
    differ = np.nonzero((got != reference).any(axis=0))[0]
    return {"new_tokens": new_tokens, "prompts": list(ids.shape),
            "cache_tokens_equal_uncached": bool((uncached_tokens == got).all()),
            "cache_logits_max_abs_err": float(np.abs(cached - full)[valid].max()),
            "tokens_equal_fp32_torch": not differ.size,
            "first_mismatch_fp32_torch": int(differ[0]) if differ.size else None}


_GGUF_CONVERT = """import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base, llama
# its BPE check knows published tokenizers by a hash, not ours (byte-level BPE trained here; no sentencepiece)
llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _llama_cpp_build(folder: Path, out: Path, src: Path | None) -> tuple[Path, dict[str, Any]]:
    """``folder`` (a Hugging Face Llama) as a llama.cpp Q4_K_M GGUF at ``out``: converted to F32 by the converter
    vendored in the llama-cpp-python sdist (``src``: its ``vendor/llama.cpp``), quantized by llama.cpp's own
    ``llama_model_quantize``. Raises _Skip (with why) where llama-cpp-python or the converter is missing."""
    import ctypes
    import subprocess

    try:
        import llama_cpp
    except ImportError as exc:
        raise _Skip(f"llama-cpp-python is not installed (pip install 'modelpress[llama-cpp]': an sdist that builds "
                    "llama.cpp with cmake and a C/C++ compiler; 0.3.36 compiles 178 objects, CMAKE_ARGS="
                    f"'-DLLAVA_BUILD=OFF' skips mtmd's 51; on 2 shared cores it did not finish in 20 min): {exc}"
                    ) from exc
    if src is None or not (src / "convert_hf_to_gguf.py").is_file() or not (src / "gguf-py").is_dir():
        raise _Skip("the HF->GGUF converter is not shipped in the llama-cpp-python wheel: pass --llama-cpp-src "
                    "(or MODELPRESS_LLAMA_CPP_SRC), the vendor/llama.cpp folder of the llama-cpp-python sdist "
                    f"(got {src})")
    out.parent.mkdir(parents=True, exist_ok=True)
    f32 = out.with_name("model-f32.gguf")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _GGUF_CONVERT, str(src), str(folder), "--outfile", str(f32),
                           "--outtype", "f32"], capture_output=True, text=True, timeout=1800, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_LOCAL_GGUF": "1"})
    if proc.returncode != 0 or not f32.is_file():
        raise RuntimeError("convert_hf_to_gguf.py failed: " + " | ".join(proc.stderr.strip().splitlines()[-3:]))
    convert_seconds = time.perf_counter() - t0
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = THREADS
    t0 = time.perf_counter()
    partial = out.with_name(out.name + ".partial")
    code = llama_cpp.llama_model_quantize(str(f32).encode(), str(partial).encode(), ctypes.byref(params))
    f32.unlink()
    if code != 0 or not partial.is_file():
        raise RuntimeError(f"llama_model_quantize (Q4_K_M) returned {code}")
    partial.replace(out)
    return out, {"convert_seconds": round(convert_seconds, 1), "quantize_seconds": round(time.perf_counter() - t0, 1),
                 "llama_cpp_python": dist_version("llama_cpp_python")}


class _Skip(Exception):
    """A peer that cannot be built here, for a reason the table states (status skipped)."""


def _llama_cpp_model(path: Path, logits_all: bool):  # noqa: ANN202 - llama_cpp.Llama
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=2 * LLAMA_SEQ, n_batch=LLAMA_SEQ, n_ubatch=LLAMA_SEQ,
                           n_threads=THREADS, n_threads_batch=THREADS, logits_all=logits_all, seed=SEED,
                           verbose=False)


def _llama_cpp_quality(path: Path, rows, reference_logp) -> dict[str, float]:  # noqa: ANN001
    """``_decoder_quality`` for a GGUF: each window evaluated from an empty cache with every position's logits."""
    import numpy as np

    llm = _llama_cpp_model(path, logits_all=True)
    kl = agree = nll = 0.0
    count = 0
    for i, row in enumerate(rows.numpy()):
        llm.reset()
        llm.eval(row.tolist())
        logits = np.array(llm.scores[: len(row) - 1], dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        ref = reference_logp[i]
        kl += float((np.exp(ref) * (ref - logp)).sum())
        agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
        nll -= float(np.take_along_axis(logp, row[1:, None], -1).sum())
        count += len(row) - 1
    return {"next_token_kl": kl / count, "top1_agreement": agree / count, "perplexity": float(np.exp(nll / count))}


def _llama_cpp_generation(path: Path, vocab: int, rounds: int, prefill_runs: int = 3) -> dict[str, Any]:
    """Batch-1 generation timed by llama.cpp's own API on measure_generation's prompt (seed 0, ``LLAMA_SEQ``
    tokens): prefill = one eval of the prompt from an empty cache (median of ``prefill_runs``), decode = greedy
    ``LLAMA_NEW_TOKENS`` tokens one eval each; medians per round, then the median over ``rounds``."""
    import llama_cpp
    import numpy as np

    prompt = np.random.default_rng(0).integers(2, vocab, size=(1, LLAMA_SEQ)).astype(np.int64)[0].tolist()
    prefill, decode = [], []
    for _ in range(rounds):
        llm = _llama_cpp_model(path, logits_all=False)
        llm.eval(prompt[:8])  # warm-up
        times = []
        for _ in range(prefill_runs + 1):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            times.append(time.perf_counter() - t0)
        prefill.append(float(np.median(times[1:])) * 1000.0)
        steps = []
        for _ in range(LLAMA_NEW_TOKENS):
            t0 = time.perf_counter()  # without logits_all, Llama.eval keeps no scores: read the last logits
            token = int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))))
            llm.eval([token])
            steps.append(time.perf_counter() - t0)
        decode.append(float(np.median(steps)) * 1000.0)
        del llm
    dec = float(np.median(decode))
    return {"prefill_ms_at_128": round(float(np.median(prefill)), 2), "decode_ms": round(dec, 3),
            "tokens_per_s": round(1000.0 / dec, 1), "round_prefill_ms": prefill, "round_decode_ms": decode,
            "timing": "llama.cpp's own API, same process, right after the interleaved ONNX Runtime rounds (not "
            "interleaved): its ratios to fp32 compare against fp32's medians from those rounds"}


def _genai_builder(folder: Path, out: Path) -> Path:
    import subprocess

    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
           "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    if proc.returncode != 0 or not (out / "model.onnx").is_file():
        raise RuntimeError("the GenAI model builder failed: " + " | ".join(proc.stderr.strip().splitlines()[-3:]))
    return out / "model.onnx"


def _decoder_quality(path: Path, rows, reference_logp) -> dict[str, float]:  # noqa: ANN001
    """Next-token KL(reference || decoder), top-1 agreement and perplexity of a cached decoder run as a prefill
    (past length 0) on the evaluation windows, against the FP32 torch model's log-probabilities."""
    import numpy as np

    from modelpress.bench.generation import layout_from_onnx
    from modelpress.export.decoder import positions
    from modelpress.targets import cpu_session

    layout = layout_from_onnx(path)
    session = cpu_session(path)
    wanted = {i.name for i in session.get_inputs()}
    kl = agree = nll = 0.0
    count = 0
    for i in range(0, len(rows), 8):
        ids = rows[i : i + 8].numpy()
        mask = np.ones_like(ids)
        feed = {"input_ids": ids, "attention_mask": mask, **layout.empty_past(len(ids))}
        if "position_ids" in wanted:
            feed["position_ids"] = positions(mask, ids.shape[1])
        logits = session.run(["logits"], {k: v for k, v in feed.items() if k in wanted})[0][:, :-1].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        ref = reference_logp[i : i + 8]
        kl += float((np.exp(ref) * (ref - logp)).sum())
        agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
        nll -= float(np.take_along_axis(logp, ids[:, 1:, None], -1).sum())
        count += ids.shape[0] * (ids.shape[1] - 1)
    return {"next_token_kl": kl / count, "top1_agreement": agree / count, "perplexity": float(np.exp(nll / count))}


def _option(text: str) -> Any:
    """A recipe option value from the command line: true/false, a number, or the text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_llama(args, tmp: Path, reporter) -> dict[str, Any]:  # noqa: ANN001, C901
    """The generation peers' table on the stdlib Llama (``modelpress.train.stdlib_llama``)."""
    import numpy as np
    import torch

    import modelpress
    from modelpress.bench import get_target
    from modelpress.bench.generation import layout_from_onnx, measure_generation
    from modelpress.data import TaskData
    from modelpress.export.decoder import export_decoder, write_genai_config
    from modelpress.export.files import onnx_file_size
    from modelpress.passes import Context
    from modelpress.quantize.passes import RepQPass
    from modelpress.quantize.weight_only_pass import WeightOnlyPass
    from modelpress.train.stdlib_lm import stdlib_llama, stdlib_splits, stdlib_windows

    started = time.perf_counter()
    with reporter.step("the stdlib Llama (trained once, cached)"):
        lm = stdlib_llama(reporter=reporter)
    with quiet():
        graph = modelpress.load(str(lm.path))
    splits = stdlib_splits()
    n_eval = LLAMA_EVAL_QUICK if args.quick else LLAMA_EVAL
    n_calibration = LLAMA_CALIBRATION_QUICK if args.quick else N_CALIBRATION
    calibration = stdlib_windows(lm.tokenizer, splits["calibration"], LLAMA_SEQ)[:n_calibration]
    evaluation = stdlib_windows(lm.tokenizer, splits["evaluation"], LLAMA_SEQ)[:n_eval]
    data = TaskData(calibration=split_of(calibration), evaluation=split_of(evaluation),
                    description=f"stdlib .py files: {len(calibration)} calibration and {len(evaluation)} held-out "
                    f"evaluation windows of {LLAMA_SEQ} tokens (split by file)")
    from modelpress.data import LanguageModelTask

    ctx = Context(workdir=tmp / "ctx", task=LanguageModelTask(), data=data,
                  target=get_target("ort-cpu", threads=THREADS), reference=graph, seed=SEED, reporter=reporter)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        logits = torch.cat([graph.module(input_ids=evaluation[i : i + 8]).logits[:, :-1]
                            for i in range(0, len(evaluation), 8)])
    reference_logp = torch.log_softmax(logits.double(), -1).numpy()
    del logits
    ref_ppl = float(np.exp(-np.take_along_axis(reference_logp, evaluation[:, 1:, None].numpy(), -1).mean()))

    info: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    ggufs: dict[str, Path] = {}  # llama.cpp's files: scored and timed by its own runtime

    def record(name: str, fn, runtime: str = "onnxruntime") -> None:  # noqa: ANN001
        t0 = time.perf_counter()
        try:
            with reporter.step(f"building {name}"), quiet():
                path, extra = fn()
        except _Skip as exc:
            info[name] = {"description": LLAMA_DESCRIPTIONS[name], "status": "skipped", "reason": str(exc)}
            reporter.log(f"[yellow]{name} skipped:[/yellow] {str(exc)[:300]}")
            return
        except Exception as exc:  # a peer that does not build is reported with its reason
            info[name] = {"description": LLAMA_DESCRIPTIONS[name], **failure(exc)}
            reporter.log(f"[yellow]{name} failed:[/yellow] {str(exc)[:300]}")
            return
        (paths if runtime == "onnxruntime" else ggufs)[name] = Path(path)
        info[name] = {"description": LLAMA_DESCRIPTIONS[name], "status": "ok",
                      "build_seconds": round(time.perf_counter() - t0, 1), **extra}

    def fp32(fused: bool | str = "auto", name: str = "fp32"):  # noqa: ANN202
        def build():  # noqa: ANN202
            out = export_decoder(graph.module, tmp / name / "decoder.onnx", new_tokens=LLAMA_NEW_TOKENS, fused=fused)
            write_genai_config(out.path.parent, out.layout, tokenizer_dir=lm.path)
            return out.path, {"verification": out.verification.to_dict(), "attention": out.attention}
        return build

    def ours(pass_, name: str):  # noqa: ANN001, ANN202
        def build():  # noqa: ANN202
            result = pass_.apply(graph, ctx)
            out = export_decoder(result.graph.module, tmp / name / "decoder.onnx", new_tokens=LLAMA_NEW_TOKENS,
                                 lowering=result.decoder_lowering, atol=1e-2)
            write_genai_config(out.path.parent, out.layout, tokenizer_dir=lm.path)
            return out.path, {"config": {pass_.name: pass_.config.model_dump(mode="json")},
                              "verification": out.verification.to_dict(), "lowering": out.lowering,
                              "attention": out.attention}
        return build

    record("fp32", fp32())
    record("fp32-plain", fp32(False, "fp32-plain"))
    if not args.no_w8a8:
        record("ours-w8a8", ours(RepQPass(recipe_options("default")), "ours-w8a8"))
    else:
        info["ours-w8a8"] = {"description": LLAMA_DESCRIPTIONS["ours-w8a8"], "status": "skipped", "reason": "--no-w8a8"}
    record("ours-int4", ours(WeightOnlyPass(recipe_options("int4-weight-only", "quantize.weight_only")), "ours-int4"))
    for extra in args.int4_variant or []:  # e.g. symmetric=true,head_bits=4: the recipe with options changed
        changes = {k: _option(v) for k, v in (kv.split("=", 1) for kv in extra.split(","))}
        name = "ours-int4 " + extra
        LLAMA_DESCRIPTIONS[name] = f"{LLAMA_DESCRIPTIONS['ours-int4']}; changed: {extra}"
        record(name, ours(WeightOnlyPass({**recipe_options("int4-weight-only", "quantize.weight_only"), **changes}),
                          name.replace(" ", "_").replace("=", "-").replace(",", "_")))
    if "fp32" in paths:
        record("ort-rtn", lambda: (_ort_rtn_decoder(paths["fp32"], tmp / "ort-rtn" / "decoder.onnx"), {}))
    record("genai-int4", lambda: (_genai_builder(lm.path, tmp / "genai-int4"), {}))
    if args.no_nncf:
        info["nncf-int4"] = {"description": LLAMA_DESCRIPTIONS["nncf-int4"], "status": "skipped", "reason": "--no-nncf"}
    elif dist_version("nncf") is None:
        info["nncf-int4"] = {"description": LLAMA_DESCRIPTIONS["nncf-int4"], "status": "skipped",
                             "reason": "nncf is not installed (pip install 'modelpress[nncf]')"}
    elif "fp32" in paths:
        def nncf_int4():  # noqa: ANN202
            path, extra = _nncf_int4_decoder(paths["fp32"], tmp / "nncf-int4" / "decoder.onnx", calibration)
            check = _quantized_verification(path, graph.module, LLAMA_NEW_TOKENS)
            if not check["cache_tokens_equal_uncached"]:
                raise RuntimeError(f"NNCF's decoder does not verify: its cached greedy tokens differ from its own "
                                   f"full-sequence forward ({check})")
            return path, {**extra, "verification": check}
        record("nncf-int4", nncf_int4)
    if args.no_llama_cpp:
        info["llama-cpp-q4km"] = {"description": LLAMA_DESCRIPTIONS["llama-cpp-q4km"], "status": "skipped",
                                  "reason": "--no-llama-cpp"}
    else:
        record("llama-cpp-q4km", lambda: _llama_cpp_build(lm.path, tmp / "llama-cpp-q4km" / "model-q4_k_m.gguf",
                                                           args.llama_cpp_src), runtime="llama.cpp")

    for name, p in list(paths.items()):
        info[name]["file_size_bytes"] = onnx_file_size(p)
        try:
            with reporter.step(f"quality of {name} (prefill on {len(evaluation)} held-out windows)"), quiet():
                info[name]["quality"] = _decoder_quality(p, evaluation, reference_logp)
        except Exception as exc:
            info[name].update(failure(exc))
            paths.pop(name)
    for name, p in list(ggufs.items()):
        info[name]["file_size_bytes"] = p.stat().st_size
        try:
            with reporter.step(f"quality of {name} (llama.cpp, {len(evaluation)} held-out windows)"), quiet():
                info[name]["quality"] = _llama_cpp_quality(p, evaluation, reference_logp)
        except Exception as exc:
            info[name].update(failure(exc))
            ggufs.pop(name)
    build_seconds = time.perf_counter() - started
    with reporter.step("generation timing (interleaved)"), quiet():
        report = measure_generation(paths, get_target("ort-cpu", threads=THREADS), baseline="fp32",
                                    prompt_len=LLAMA_SEQ, new_tokens=LLAMA_NEW_TOKENS, batch_sizes=[1],
                                    rounds=args.rounds, reporter=reporter)
    for name in paths:
        s = report.stats(name, 1)
        info[name]["generation_batch1"] = {
            "prefill_ms_at_128": round(s.prefill_ms, 2), "decode_ms": round(s.decode_ms, 3),
            "tokens_per_s": round(s.tokens_per_s, 1), "decode_speedup_vs_fp32": s.decode_speedup,
            "prefill_speedup_vs_fp32": s.prefill_speedup, "peak_memory_mb": s.peak_memory_mb}
        info[name]["size_vs_fp32"] = round(info[name]["file_size_bytes"] / info["fp32"]["file_size_bytes"], 4)
    base = report.stats("fp32", 1)
    for name, p in ggufs.items():
        try:
            with reporter.step(f"generation timing of {name} (llama.cpp, after the ORT rounds)"), quiet():
                g = _llama_cpp_generation(p, layout_from_onnx(paths["fp32"]).vocab_size, args.rounds)
        except Exception as exc:
            info[name].update(failure(exc))
            continue
        info[name]["generation_batch1"] = {**g, "decode_speedup_vs_fp32": base.decode_ms / g["decode_ms"],
                                           "prefill_speedup_vs_fp32": base.prefill_ms / g["prefill_ms_at_128"]}
        info[name]["size_vs_fp32"] = round(info[name]["file_size_bytes"] / info["fp32"]["file_size_bytes"], 4)
    return {
        "model": f"LlamaForCausalLM trained by modelpress.train.stdlib_llama ({lm.meta['parameters']} parameters, "
        f"{lm.meta['model']})",
        "training": {k: lm.meta[k] for k in ("corpus", "corpus_files", "train_tokens_seen", "held_out", "train_seconds")
                     if k in lm.meta},
        "data": data.description,
        "reference_perplexity_torch_fp32": ref_ppl,
        "protocol": (
            f"every variant built first; quality: each cached decoder run as a prefill (past length 0) on "
            f"{len(evaluation)} held-out windows of {LLAMA_SEQ} tokens, next-token KL and top-1 agreement against "
            f"the FP32 torch model, perplexity of the held-out text; generation: bench.generation.measure_generation"
            f" on ort-cpu at {THREADS} threads, batch 1, prompt {LLAMA_SEQ}, {LLAMA_NEW_TOKENS} new tokens, "
            f"variants interleaved round-robin with fresh sessions, {args.rounds} rounds; speedups are medians of "
            "per-round ratios against fp32"),
        "variants": info,
        "generation": report.to_dict(),
        "build_seconds": round(build_seconds, 1),
    }


def print_llama_table(con, res: dict[str, Any]) -> None:  # noqa: ANN001
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{res['model']}\nort-cpu, {THREADS} threads, batch 1, prompt {LLAMA_SEQ}")
    for col in ("variant", "tokens/s", "decode vs fp32", "prefill ms", "file MB", "size vs fp32", "KL", "top-1",
                "perplexity"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, e in res["variants"].items():
        if e.get("status") != "ok":
            table.add_row(name, *["-"] * 7, escape(f"{e.get('status')}: {str(e.get('reason', ''))[:60]}"))
            continue
        g, q = e.get("generation_batch1", {}), e.get("quality", {})
        table.add_row(name, fmt(g.get("tokens_per_s"), ".1f"), fmt(g.get("decode_speedup_vs_fp32"), ".2f", "x"),
                      fmt(g.get("prefill_ms_at_128"), ".1f"), fmt(e["file_size_bytes"] / 1e6, ".1f"),
                      fmt(e.get("size_vs_fp32"), ".3f"), fmt(q.get("next_token_kl"), ".2e"),
                      fmt(q.get("top1_agreement"), ".4f"), fmt(q.get("perplexity"), ".3f"))
    con.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = timing_parser(__doc__, RESULTS / "language_model.json", runs=20, min_time=0.5, threads=False)
    parser.add_argument("--no-nncf", action="store_true", help="skip NNCF")
    parser.add_argument("--llama", action="store_true",
                        help="the generation peers' table on the stdlib Llama (modelpress.train.stdlib_llama) instead; "
                        "writes results/language_model_llama.json unless --out")
    parser.add_argument("--no-w8a8", action="store_true", help="--llama: skip our W8A8 (the slowest to build)")
    parser.add_argument("--int4-variant", action="append", metavar="K=V[,K=V]",
                        help="--llama: also our int4-weight-only recipe with these pass options changed (repeatable), "
                        "e.g. symmetric=true or head_bits=4")
    parser.add_argument("--no-llama-cpp", action="store_true", help="--llama: skip llama.cpp Q4_K_M")
    parser.add_argument(
        "--llama-cpp-src", type=Path,
        default=Path(os.environ["MODELPRESS_LLAMA_CPP_SRC"]) if os.environ.get("MODELPRESS_LLAMA_CPP_SRC") else None,
        help="--llama: the vendor/llama.cpp folder of the llama-cpp-python sdist (its HF->GGUF converter and gguf-py; "
        "default $MODELPRESS_LLAMA_CPP_SRC)")
    parser.add_argument(
        "--train-steps", type=int, default=None,
        help=f"training steps of the model (default {TRAIN_STEPS}; --quick: {TRAIN_STEPS_QUICK}); cached per value",
    )
    args = parse_timing_args(parser, argv)
    if args.llama and args.out == RESULTS / "language_model.json":
        args.out = RESULTS / "language_model_llama.json"

    from modelpress.bench import system_info, write_json_atomic
    from modelpress.progress import Reporter

    con = console()
    reporter = Reporter()
    started = time.perf_counter()
    system = system_info()
    result: dict[str, Any] = {
        "benchmark": "language_model",
        "quick": args.quick,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "system": system,
        "versions": {
            **system["versions"],
            **{d: dist_version(d) for d in ("nncf", "tokenizers", "transformers", "modelpress")},
        },
    }
    with tempfile.TemporaryDirectory(prefix="modelpress-language-model-") as tmp:
        result.update((run_llama if args.llama else run)(args, Path(tmp), reporter))
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = write_json_atomic(args.out, result)
    con.print(f"CPU: {system['cpu_model']} | {system['cores_available']} cores")
    (print_llama_table if args.llama else print_table)(con, result)
    con.print(f"wrote {out} ({result['seconds']:.0f} s{', QUICK: smoke numbers' if args.quick else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
