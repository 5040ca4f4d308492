"""Post-training quantization: modelpress RepQ (``quantize.repq``) against NNCF and ONNX Runtime, in one run.

Two parts, both written to benchmarks/results/quantization.json (with the CPU's instruction-set flags):

**MiniLM W8A8** (the pretrained all-MiniLM-L6-v2, ONNX Runtime CPU). Variants:

- ``fp32``: the model exported with ``export_onnx(optimize="none")`` (eager attention, opset 17),
- ``ours``: the built-in ``int8`` recipe: ``quantize.repq`` W8A8 (reparameterized post-norm scales, plus
  per-channel reparameterized input scales at the Linear inputs a fidelity scan picks (``auto_channel``),
  MSE-searched activation ranges elsewhere, GPTQ, 7-bit weights only on CPUs without VNNI), every
  quantizable layer INT8, exported to QDQ ONNX with ``export_qdq`` (ONNX Runtime's MatMulIntegerToFloat
  with the bias inside),
- ``ours-norms-only``: ``quantize.repq`` with no options (per-channel reparameterization at the norms
  only), an ablation row, not used for the acceptance,
- ``nncf``: ``quantize.nncf`` (nncf.quantize on the FP32 ONNX file, transformer model type),
- ``ort-static``: ``quantize.ort-static`` (quantize_static, QDQ, per-channel MatMul weights, MinMax),
- ``ort-dynamic``: ``quantize.ort-dynamic`` (quantize_dynamic, per-channel MatMul weights).

Every variant gets the same 128 calibration sentences (the packaged calibration split) and is judged on
240 held-out sentences (the packaged evaluation split): mean and minimum cosine of mean-pooled embeddings
to the FP32 torch model's, and Spearman of all pairwise similarities. Calibration time is the wall time
of each pass. All ONNX files are built first and then timed interleaved (round-robin, fresh sessions
every round, warm-up, median of per-round medians, speedups as the median of per-round ratios against
``fp32``) at 2 threads and at 1 thread, batch 1 and 8, sequence 128. The kernels ONNX Runtime runs
(read from its optimized graph) are recorded for every file. The acceptance compares ``ours`` with the
fastest peer (latency, per thread count and batch) and with the most faithful peer (mean cosine); the
JSON holds the ratios and the verdicts.

**Digits ViT** (HF ViTForImageClassification, 8x8 digits, patch 2, 4 blocks; the modelpress zoo model,
about 0.975 held-out accuracy). Accuracy on the 359 held-out images at W8A8, W6A6 and W4A4 for min-max
PTQ, percentile PTQ, NNCF (W8A8 only: NNCF's PTQ is 8-bit) and ours, with each component of ours turned
off (or, for dual clipping, which is off by default, turned on) as an ablation row. Every ViT row
quantizes all Linear/Conv layers and both attention matmuls, with the same 128 calibration images; at W6
and W4 the patch embedding and the classifier stay at 8 bits in every row. Ours at W8A8 is also exported
to QDQ ONNX and its accuracy measured in ONNX Runtime on this CPU.

    python benchmarks/quantization.py              # the full run (5 rounds, a few minutes)
    python benchmarks/quantization.py --quick      # a smoke run (1 round, few runs, 48 sentences)
    python benchmarks/quantization.py --skip-vit --no-nncf
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
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

BASELINE = "fp32"
OURS = "ours"
OURS_EXTRA = "ours-norms-only"
PEERS = ("nncf", "ort-static", "ort-dynamic")
BATCHES, SEQ = [1, 8], 128
THREADS = (2, 1)
NOISE_TOLERANCE = 0.03  # "at least as fast": ours >= 0.97x the fastest peer (the strict verdict is kept too)
N_CALIBRATION = 128
N_EVALUATION = 240
N_EVALUATION_QUICK = 48
VIT_BITS = ("w8a8", "w6a6", "w4a4")

OURS_RULE = (
    "'ours' is the built-in `int8` recipe (its quantize.repq options are read from the recipe file); "
    "'ours-norms-only' (quantize.repq defaults: per-channel scales at the norms only) is reported beside "
    "it but is not used for the acceptance"
)
MINILM_DESCRIPTIONS = {
    BASELINE: "FP32, export_onnx(optimize='none'), eager attention, opset 17",
    OURS: "recipe int8: quantize.repq W8A8 (reparameterized per-channel scales at the norms and at the Linear "
    "inputs the fidelity scan picks, MSE activation ranges elsewhere, GPTQ, 7-bit weights only without "
    "VNNI), every quantizable layer INT8, export_qdq",
    OURS_EXTRA: "quantize.repq default config (per-channel reparameterization at the norms only), every "
    "quantizable layer INT8, exported with export_qdq",
    "nncf": "quantize.nncf: nncf.quantize on the FP32 ONNX file, model_type TRANSFORMER, preset mixed, "
    "fast bias correction",
    "ort-static": "quantize.ort-static: onnxruntime quantize_static, QDQ, MatMul only, per-channel int8 "
    "weights, uint8 activations, MinMax calibration",
    "ort-dynamic": "quantize.ort-dynamic: onnxruntime quantize_dynamic, MatMul only, per-channel int8 "
    "weights",
}

# ---------------------------------------------------------------------------------------- ViT configs

# Min-max and percentile PTQ are the plain fake-quant pipeline expressed as RepQ configs with every RepQ
# component off: per-channel min-max weights, per-tensor activation ranges from the observer, uniform
# attention probabilities, no reparameterization, no clipping learning, no reconstruction.
_PLAIN = {
    "weight_observer": "minmax",
    "probs": "uniform",
    "reparam": False,
    "dual_clipping": False,
    "reconstruction": "none",
    "log2_inference": False,
}
VIT_METHODS: dict[str, dict[str, Any]] = {
    "minmax_ptq": {**_PLAIN, "act_observer": "minmax"},
    "percentile_ptq": {**_PLAIN, "act_observer": "percentile"},
    "ours": {},
    "ours_no_reparam": {"reparam": False},
    "ours_uniform_softmax": {"probs": "uniform"},
    "ours_dual_clipping": {"dual_clipping": True},
    "ours_no_reconstruction": {"reconstruction": "none"},
}
VIT_DESCRIPTIONS = {
    "fp32": "the trained model, FP32 (torch)",
    "minmax_ptq": "min-max PTQ: per-channel min-max weights, per-tensor min-max activations, uniform "
    "softmax quantizer, no reparameterization, no reconstruction",
    "percentile_ptq": "percentile PTQ: per-channel min-max weights, per-tensor 99.99th-percentile "
    "activations, uniform softmax quantizer, no reparameterization, no reconstruction",
    "nncf": "NNCF nncf.quantize on the FP32 ONNX file (transformer model type), accuracy in ONNX Runtime",
    "ours": "quantize.repq defaults (reparameterization, log-sqrt2 softmax quantizer reparameterized to "
    "log2, MSE activation ranges, GPTQ), attention matmuls quantized",
    "ours_no_reparam": "ours without scale reparameterization (post-norm activations per tensor)",
    "ours_uniform_softmax": "ours with a uniform softmax quantizer instead of log-sqrt2/log2",
    "ours_dual_clipping": "ours with learned dual clipping of post-norm activations (off by default)",
    "ours_no_reconstruction": "ours without GPTQ weight reconstruction (MSE-searched weight ranges)",
}
VIT_EXPORTS = {
    "ours_w8a8": "the 'ours' W8A8 row (attention matmuls quantized, log2 softmax)",
    "ours_uniform_softmax_w8a8": "the 'ours_uniform_softmax' W8A8 row (attention matmuls quantized, "
    "uniform softmax)",
    "ours_default_w8a8": "quantize.repq with no options (the pass defaults a recipe gets: attention "
    "matmuls float, log2 not used)",
}
VIT_COMMON = {"attention": True}  # every ViT row quantizes the two attention matmuls too
VIT_KEEP_8BIT = ("vit.embeddings.patch_embeddings.projection", "classifier")


# MiniLM component ablation (torch fake-quant fidelity on the held-out sentences): the digits ViT is too
# easy to rank components (every row lands within a few images of FP32), MiniLM's cosine fidelity is not.
ABLATION_BITS = ("w8a8", "w6a6", "w4a8")


def ablation_methods() -> dict[str, dict[str, Any]]:
    ours = {**recipe_options("int8"), "attention": True}
    return {
        "minmax_ptq": {**_PLAIN, "act_observer": "minmax", "attention": True},
        "percentile_ptq": {**_PLAIN, "act_observer": "percentile", "attention": True},
        "ours": ours,
        "ours_no_reparam": {**ours, "reparam": False},
        "ours_no_channel_sites": {**ours, "auto_channel": 0},
        "ours_uniform_softmax": {**ours, "probs": "uniform"},
        "ours_dual_clipping": {**ours, "dual_clipping": True},
        "ours_no_reconstruction": {**ours, "reconstruction": "none"},
    }


def vit_policy(bits: str) -> dict[str, str]:
    """At W6/W4 the first (patch embedding) and last (classifier) layers stay at 8 bits, in every row."""
    return {} if bits == "w8a8" else dict.fromkeys(VIT_KEEP_8BIT, "w8a8")


# ------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _kernels(path: Path) -> dict[str, Any]:
    from modelpress.quantize.qdq import integer_kernel_count, ort_kernels

    k = ort_kernels(path, workdir=path.parent)
    return {"integer_kernels": integer_kernel_count(k), "kernels": dict(sorted(k.items()))}


def _per_round_ratio(report, faster: str, slower: str, batch: int) -> float:  # noqa: ANN001 - BenchReport
    """Median over rounds of slower_ms / faster_ms (> 1: ``faster`` is faster), both from the same round."""
    a = report.stats(faster, batch, SEQ).round_medians_ms
    b = report.stats(slower, batch, SEQ).round_medians_ms
    return float(statistics.median(y / x for x, y in zip(a, b, strict=True) if x > 0))


# ---------------------------------------------------------------------------------------------- MiniLM


def _minilm_setup(args: argparse.Namespace, workdir: Path, reporter) -> tuple:  # noqa: ANN001
    """MiniLM, its calibration/evaluation sentences, the task, cached FP32 reference outputs, a Context."""
    import modelpress
    from modelpress.compress import Context
    from modelpress.data import EmbeddingTask, load_data
    from modelpress.targets import get_target

    with reporter.step("loading all-MiniLM-L6-v2"), quiet():
        graph = modelpress.load()
    n_eval = N_EVALUATION_QUICK if args.quick else N_EVALUATION
    data = load_data(
        None, graph.input_spec, graph.tokenizer, n_calibration=N_CALIBRATION, n_evaluation=n_eval, max_length=SEQ
    )
    task = EmbeddingTask()
    # fidelity runs on 2 ONNX Runtime threads; latency targets are set per measurement below
    ctx = Context(workdir=workdir, task=task, data=data, target=get_target("ort-cpu", threads=2), reference=graph,
                  seed=0, reporter=reporter)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    with reporter.step("reference embeddings (torch FP32)"):
        reference = ctx.reference_outputs()
    return graph, data, task, reference, ctx


def run_minilm(args: argparse.Namespace, tmp: Path, reporter) -> dict[str, Any]:  # noqa: ANN001
    from modelpress.bench import get_target, measure
    from modelpress.compress import Context
    from modelpress.export import export_onnx
    from modelpress.export.files import onnx_file_size
    from modelpress.quantize.ort_dynamic import OrtDynamicInt8
    from modelpress.quantize.passes import NNCFQuantize, OrtStaticInt8, RepQPass, cpu_has_vnni

    started = time.perf_counter()
    graph, data, task, reference, ctx = _minilm_setup(args, tmp / "ctx", reporter)
    spec = graph.input_spec
    vnni = cpu_has_vnni()
    reduce_range = not vnni  # ONNX Runtime's advice for U8S8 on CPUs without VNNI; ours does the same

    info: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}

    with reporter.step("FP32 export"), quiet():
        exported = export_onnx(graph.module, spec, tmp / "fp32" / "model.onnx", optimize="none")
    paths[BASELINE] = exported.path
    info[BASELINE] = {
        "status": "ok",
        "export_seconds": round(exported.export_seconds, 2),
        "verification": None if exported.verification is None else vars(exported.verification),
    }

    for name, config in ((OURS, recipe_options("int8")), (OURS_EXTRA, {})):
        try:
            repq = RepQPass(config)
            with reporter.step(f"{name}: quantize.repq {config or '(defaults)'}"), quiet():
                t0 = time.perf_counter()
                result = repq.apply(graph, ctx)
                seconds = time.perf_counter() - t0
            path = tmp / name / "model.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            with reporter.step(f"{name}: QDQ export"), quiet():
                # the pass's own lowering (what the pipeline deploys), verified against the torch model
                exported_q = ctx.export(result.graph, path, exporter=result.exporter)
                export_seconds = exported_q.export_seconds
                verification = exported_q.verification
        except Exception as exc:
            if name == OURS:
                raise
            info[name] = failure(exc)
            reporter.log(f"[yellow]{name} failed:[/yellow] {exc}")
            continue
        metrics = result.metrics
        paths[name] = path
        info[name] = {
            "status": "ok",
            "config": {
                "options_given": config,
                "quantize.repq": repq.config.model_dump(),
                "weight_reduce_range_resolved": not vnni,
            },
            "calibration_seconds": round(seconds, 2),
            "export_seconds": round(export_seconds, 2),
            "calibration_samples": metrics.get("calibration_samples"),
            "kept_float": (metrics.get("auto_float") or {}).get("kept_float", []),
            "channel_sites": (metrics.get("channel_sites") or {}).get("sites", []),
            "qdq_vs_torch_fake_quant": verification,
        }

    peers: list[tuple[str, Any]] = []
    if args.no_nncf:
        info["nncf"] = {"status": "skipped", "reason": "--no-nncf"}
    else:
        peers.append(("nncf", NNCFQuantize({"samples": N_CALIBRATION})))
    peers.append(("ort-static", OrtStaticInt8({"samples": N_CALIBRATION, "reduce_range": reduce_range})))
    peers.append(("ort-dynamic", OrtDynamicInt8({"reduce_range": reduce_range})))
    for name, pass_ in peers:
        try:
            work = tmp / name
            work.mkdir(parents=True, exist_ok=True)
            peer_ctx = Context(workdir=work, data=data, seed=0, reporter=reporter)
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
            "config": {pass_.name: pass_.config.model_dump()},
            "calibration_seconds": round(seconds, 2),
            "calibration_samples": 0 if name == "ort-dynamic" else N_CALIBRATION,
            "metrics": out.metrics,
        }

    for name, path in list(paths.items()):
        entry = info[name]
        entry["description"] = MINILM_DESCRIPTIONS[name]
        entry["file_size_bytes"] = onnx_file_size(path)
        try:
            entry.update(_kernels(path))
            with reporter.step(f"fidelity of {name}"):
                entry["fidelity"] = ctx.evaluate(path).metrics
        except Exception as exc:
            if name in (BASELINE, OURS):
                raise
            info[name] = {**entry, **failure(exc)}
            paths.pop(name)
            reporter.log(f"[yellow]{name} does not run:[/yellow] {exc}")
    build_seconds = time.perf_counter() - started

    measurements: dict[str, Any] = {}
    reports = {}
    for threads in THREADS:
        target = get_target("ort-cpu", threads=threads)
        reports[threads] = report = measure(
            paths,
            spec,
            target,
            **timing_kwargs(args),
            max_time_s=30.0,
            baseline=BASELINE,
            batch_sizes=BATCHES,
            seq_lens=[SEQ],
            memory=threads == THREADS[0] and not args.quick,
            reporter=reporter,
        )
        for name, variant in report.variants.items():
            if variant.path:
                variant.path = f"{name}/{Path(variant.path).name}"
            lat = info[name].setdefault("latency", {})
            for b in BATCHES:
                s = report.stats(name, b, SEQ)
                lat[f"threads{threads}_batch{b}"] = {
                    "median_ms": round(s.median_ms, 3),
                    "speedup_vs_fp32": None if s.speedup is None else round(s.speedup, 4),
                    "cpu_ms": None if s.cpu_ms is None else round(s.cpu_ms, 3),
                    "peak_memory_mb": s.peak_memory_mb,
                }
        measurements[f"threads{threads}"] = report.to_dict()

    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, FP32, 6 blocks, hidden 384), output "
        "last_hidden_state",
        "data": data.description,
        "calibration_samples": N_CALIBRATION,
        "evaluation_samples": len(data.evaluation),
        "cpu_has_vnni": vnni,
        "reduce_range": {
            "ours": "auto: 7-bit weights where the CPU has no VNNI (resolved: "
            f"{'7-bit' if reduce_range else '8-bit'})",
            "ort-static/ort-dynamic": f"reduce_range={reduce_range} by the same rule (ONNX Runtime's advice "
            "for U8S8 kernels without VNNI)",
        },
        "protocol": (
            f"every variant built first; fidelity on {len(data.evaluation)} held-out sentences (mean and min "
            "cosine of mean-pooled ONNX embeddings to the FP32 torch model's, Spearman of pairwise "
            f"similarities); latency: ort-cpu at {' and '.join(map(str, THREADS))} threads, batch "
            f"{' and '.join(map(str, BATCHES))}, sequence {SEQ}, all variants interleaved round-robin with "
            f"fresh sessions every round, {args.rounds} rounds, warm-up, >= {args.runs} runs and >= "
            f"{args.min_time}s per variant, shape and round; medians of per-round medians; speedups are "
            "medians of per-round ratios against fp32"
        ),
        "variants": info,
        "acceptance": acceptance(info, reports),
        "measurements": measurements,
        "build_seconds": round(build_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _compare(info: dict[str, dict[str, Any]], reports: dict, ours: str, peers: list[str]) -> dict[str, Any]:
    """``ours`` against the fastest peer (per thread count and batch) and the most faithful one."""
    latency: dict[str, Any] = {}
    for threads, report in reports.items():
        for b in BATCHES:
            fastest = min(peers, key=lambda p: report.stats(p, b, SEQ).median_ms)
            ratio = _per_round_ratio(report, ours, fastest, b)
            ours_s, peer_s = report.stats(ours, b, SEQ), report.stats(fastest, b, SEQ)
            latency[f"threads{threads}_batch{b}"] = {
                "fastest_peer": fastest,
                "ours_ms": round(ours_s.median_ms, 3),
                "fastest_peer_ms": round(peer_s.median_ms, 3),
                "ours_speedup_vs_fp32": ours_s.speedup,
                "fastest_peer_speedup_vs_fp32": peer_s.speedup,
                "ours_vs_fastest_peer": round(ratio, 4),
                "ours_vs_fastest_peer_cpu_time": None
                if not (ours_s.cpu_ms and peer_s.cpu_ms)
                else round(peer_s.cpu_ms / ours_s.cpu_ms, 4),
                "ours_fastest": ratio >= 1.0 - NOISE_TOLERANCE,
                "ours_fastest_strict": ratio >= 1.0,
            }
    fid = {p: info[p]["fidelity"] for p in peers}
    best = max(peers, key=lambda p: fid[p]["fidelity_mean"])
    mine = info[ours]["fidelity"]
    best_f = fid[best]
    fidelity = {
        "most_faithful_peer": best,
        "ours_fidelity_mean": mine["fidelity_mean"],
        "peer_fidelity_mean": best_f["fidelity_mean"],
        "ours_vs_peer_fidelity_mean": mine["fidelity_mean"] / best_f["fidelity_mean"],
        # how many times smaller our cosine error (1 - cosine) is than the peer's
        "peer_error_over_ours": (1.0 - best_f["fidelity_mean"]) / max(1e-12, 1.0 - mine["fidelity_mean"]),
        "ours_fidelity_min": mine["fidelity_min"],
        "peer_fidelity_min": best_f["fidelity_min"],
        "ours_spearman": mine["spearman"],
        "peer_spearman": best_f["spearman"],
        "ours_min_at_least_peer_min": mine["fidelity_min"] >= best_f["fidelity_min"],
        "ours_spearman_at_least_peer_spearman": mine["spearman"] >= best_f["spearman"],
    }
    fastest_all = all(v["ours_fastest"] for v in latency.values())
    most_faithful = mine["fidelity_mean"] >= best_f["fidelity_mean"]
    return {
        "latency": latency,
        "fidelity": fidelity,
        "ours_fastest": fastest_all,
        "ours_fastest_strict": all(v["ours_fastest_strict"] for v in latency.values()),
        "ours_most_faithful": most_faithful,
        "passed": fastest_all and most_faithful,
    }


def acceptance(info: dict[str, dict[str, Any]], reports: dict) -> dict[str, Any]:
    peers = [p for p in PEERS if p in reports[THREADS[0]].variants and "fidelity" in info.get(p, {})]
    out: dict[str, Any] = {
        "ours": OURS,
        "rule": OURS_RULE,
        "criteria": (
            "ours_fastest: at every thread count and batch, median over rounds of (fastest peer ms / ours "
            f"ms) >= {1 - NOISE_TOLERANCE:.2f} ({NOISE_TOLERANCE:.0%} noise tolerance; "
            "ours_fastest_strict: >= 1.00); the fastest peer is the one with the lowest median latency at "
            "that thread count and batch. ours_most_faithful: ours fidelity_mean >= the most faithful "
            "peer's"
        ),
        "noise_tolerance": NOISE_TOLERANCE,
        "peers": peers,
        "peers_missing": [p for p in PEERS if p not in peers],
    }
    if not peers:
        out["passed"] = None
        return out
    out.update(_compare(info, reports, OURS, peers))
    if OURS_EXTRA in reports[THREADS[0]].variants:
        out["extra"] = {OURS_EXTRA: _compare(info, reports, OURS_EXTRA, peers)}
    return out


# ------------------------------------------------------------------------------------------ digits ViT


def run_vit(args: argparse.Namespace, tmp: Path, reporter) -> dict[str, Any]:  # noqa: ANN001
    from modelpress.bench import get_target, measure
    from modelpress.compress import Context
    from modelpress.data import ClassificationTask, load_data, onnx_runner, torch_runner
    from modelpress.export import export_onnx
    from modelpress.graph.model_graph import ModelGraph
    from modelpress.quantize.passes import NNCFQuantize, RepQPass, cpu_has_vnni
    from modelpress.quantize.qdq import export_qdq, log_quantizer_count, verify_qdq
    from modelpress.train.zoo import digits_vit

    started = time.perf_counter()
    with reporter.step("digits ViT (zoo, trained once and cached)"), quiet():
        zm = digits_vit()
    spec, names = zm.input_spec, list(zm.input_spec.names)
    graph = ModelGraph(zm.module, spec, name="digits_vit")
    data = load_data("digits", spec, n_calibration=N_CALIBRATION, n_evaluation=None)
    task = ClassificationTask()
    ctx = Context(workdir=tmp / "vit-ctx", data=data, seed=0, reporter=reporter)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    reference = task.reference_cache(torch_runner(graph.module, names), data.evaluation)

    def evaluate(runner) -> dict[str, float]:  # noqa: ANN001
        m = task.evaluate(runner, None, data.evaluation, reference_outputs=reference)
        return {k: round(v, 5) for k, v in m.items()}

    rows: dict[str, dict[str, Any]] = {
        "fp32": {"description": VIT_DESCRIPTIONS["fp32"], **evaluate(torch_runner(graph.module, names))}
    }
    modules: dict[str, tuple[Any, float]] = {}  # W8A8 fake-quant modules to export, with torch accuracy
    onnx_rows: dict[str, Any] = {}

    # Small model, tiny ops: one torch thread is faster than two and does not fight a busy machine.
    with _torch_threads(1):
        for method, overrides in VIT_METHODS.items():
            row: dict[str, Any] = {"description": VIT_DESCRIPTIONS[method], "bits": {}}
            for bits in VIT_BITS:
                config = {**VIT_COMMON, **overrides, "default": bits, "policy": vit_policy(bits)}
                try:
                    with reporter.step(f"ViT {method} {bits}"), quiet():
                        t0 = time.perf_counter()
                        result = RepQPass(config).apply(graph, ctx)
                        seconds = time.perf_counter() - t0
                    metrics = evaluate(torch_runner(result.graph.module, names))
                except Exception as exc:
                    row["bits"][bits] = failure(exc)
                    reporter.log(f"[yellow]ViT {method} {bits} failed:[/yellow] {exc}")
                    continue
                row["bits"][bits] = {**metrics, "calibration_seconds": round(seconds, 2)}
                if method in ("ours", "ours_uniform_softmax") and bits == "w8a8":
                    modules[f"{method}_w8a8"] = (result.graph.module, metrics["accuracy"])
            row["config"] = {
                "options_given": {**VIT_COMMON, **overrides, "policy (below w8a8)": vit_policy("w4a4")},
                "quantize.repq": RepQPass({**VIT_COMMON, **overrides}).config.model_dump(),
            }
            rows[method] = row
        # What a recipe deploys: the pass defaults (attention matmuls float, as ONNX Runtime runs them).
        try:
            with reporter.step("ViT ours W8A8, pass defaults (attention float)"), quiet():
                module = RepQPass({}).apply(graph, ctx).graph.module
            modules["ours_default_w8a8"] = (module, evaluate(torch_runner(module, names))["accuracy"])
        except Exception as exc:
            onnx_rows["ours_default_w8a8"] = failure(exc)

    # NNCF (8-bit only) on the FP32 ONNX export; ours W8A8 exported to QDQ and run in ONNX Runtime.
    with reporter.step("ViT FP32 ONNX export"), quiet():
        fp32_onnx = export_onnx(graph.module, spec, tmp / "vit-fp32" / "model.onnx", optimize="none").path
    onnx_rows["fp32"] = {"accuracy_onnx": evaluate(onnx_runner(fp32_onnx))["accuracy"]}
    onnx_paths: dict[str, Path] = {"fp32": Path(fp32_onnx)}
    nncf_row: dict[str, Any] = {"description": VIT_DESCRIPTIONS["nncf"], "bits": {}}
    if args.no_nncf:
        nncf_row["status"] = "skipped: --no-nncf"
    else:
        try:
            work = tmp / "vit-nncf"
            work.mkdir(parents=True, exist_ok=True)
            pass_ = NNCFQuantize({"samples": N_CALIBRATION})
            with reporter.step("ViT NNCF W8A8"), quiet():
                t0 = time.perf_counter()
                out = pass_.apply(fp32_onnx, Context(workdir=work, data=data, seed=0, reporter=reporter))
                seconds = time.perf_counter() - t0
            nncf_row["bits"]["w8a8"] = {
                **evaluate(onnx_runner(out.onnx_path)),
                "calibration_seconds": round(seconds, 2),
                **_kernels(Path(out.onnx_path)),
            }
            nncf_row["config"] = {pass_.name: pass_.config.model_dump()}
        except Exception as exc:
            nncf_row["bits"]["w8a8"] = failure(exc)
            reporter.log(f"[yellow]ViT NNCF failed:[/yellow] {exc}")
    for bits in VIT_BITS[1:]:
        nncf_row["bits"][bits] = "n/a: NNCF PTQ is 8-bit"
    rows = (
        {k: rows[k] for k in ("fp32", "minmax_ptq", "percentile_ptq")}
        | {"nncf": nncf_row}
        | {k: v for k, v in rows.items() if k not in ("fp32", "minmax_ptq", "percentile_ptq")}
    )

    for name, (module, torch_accuracy) in modules.items():
        forms = ["uniform", "simulate"] if log_quantizer_count(module) else ["uniform"]
        for form in forms:
            row = name if form == "uniform" else f"{name}_log2_simulated"
            description = VIT_EXPORTS[name] + (f"; log2 probabilities exported as {form!r}" if len(forms) > 1 else "")
            try:
                path = tmp / f"vit-{row}" / "model.onnx"
                path.parent.mkdir(parents=True, exist_ok=True)
                with reporter.step(f"ViT {row}: QDQ export"), quiet():
                    example = spec.make_torch(2)[names[0]]
                    export_qdq(
                        module, example, path, input_names=names, dynamic_axes=spec.dynamic_axes(), log_form=form
                    )
                    verification = verify_qdq(
                        path, module, [spec.make_torch(4, seed=s)[names[0]] for s in (1, 2)]
                    )
                onnx_rows[row] = {
                    "description": description,
                    **evaluate(onnx_runner(path)),
                    "torch_fake_quant_accuracy": torch_accuracy,
                    "qdq_vs_torch_fake_quant": verification,
                    **_kernels(path),
                }
                onnx_paths[row] = path
            except Exception as exc:
                onnx_rows[row] = {"description": description, **failure(exc)}
                reporter.log(f"[yellow]ViT {row}: no QDQ export:[/yellow] {exc}")
    if len(onnx_paths) > 1:
        with reporter.step("ViT ONNX latency (interleaved)"), quiet():
            bench = measure(
                onnx_paths,
                spec,
                get_target("ort-cpu", threads=THREADS[0]),
                **timing_kwargs(args),
                max_time_s=10.0,
                baseline="fp32",
                batch_sizes=BATCHES,
                memory=False,
                reporter=reporter,
            )
        for row, variant in bench.to_dict()["variants"].items():
            onnx_rows[row]["latency"] = [
                {k: sh.get(k) for k in ("batch", "median_ms", "speedup")} for sh in variant.get("shapes", [])
            ]

    return {
        "model": f"modelpress zoo digits_vit (HF ViTForImageClassification, 8x8, patch 2, 4 blocks, "
        f"{sum(p.numel() for p in zm.module.parameters())} parameters), zoo test accuracy "
        f"{zm.test_accuracy:.4f}",
        "data": data.description,
        "calibration_samples": len(data.calibration),
        "evaluation_samples": len(data.evaluation),
        "protocol": (
            "accuracy of the torch fake-quant model on the held-out digits (NNCF: in ONNX Runtime); "
            "agreement = same argmax as FP32. Every row quantizes all Linear/Conv layers and both attention "
            "matmuls (quantize.repq attention: true); at W6A6/W4A4 the patch embedding and the classifier "
            "stay at W8A8 in every row. One evaluation sample is "
            f"{1 / len(data.evaluation):.4f} accuracy."
        ),
        "keep_8bit_below_w8": list(VIT_KEEP_8BIT),
        "cpu_has_vnni": cpu_has_vnni(),
        "rows": rows,
        "onnx": onnx_rows,
        "seconds": round(time.perf_counter() - started, 1),
    }


def run_minilm_ablation(args: argparse.Namespace, tmp: Path, reporter) -> dict[str, Any]:  # noqa: ANN001
    from modelpress.data import torch_runner
    from modelpress.quantize.passes import RepQPass

    started = time.perf_counter()
    graph, data, task, reference, ctx = _minilm_setup(args, tmp / "ablation-ctx", reporter)
    names = list(graph.input_spec.names)
    rows: dict[str, dict[str, Any]] = {}
    for name, config in ablation_methods().items():
        rows[name] = {"config": config, "bits": {}}
        for bits in ABLATION_BITS:
            try:
                with reporter.step(f"MiniLM ablation {name} {bits}"), quiet():
                    t0 = time.perf_counter()
                    result = RepQPass({**config, "default": bits}).apply(graph, ctx)
                    seconds = time.perf_counter() - t0
                    m = task.evaluate(
                        torch_runner(result.graph.module, names), None, data.evaluation, reference_outputs=reference
                    )
                rows[name]["bits"][bits] = {
                    **{k: round(v, 5) for k, v in m.items()},
                    "calibration_seconds": round(seconds, 2),
                    "channel_sites": (result.metrics.get("channel_sites") or {}).get("sites", []),
                }
            except Exception as exc:
                rows[name]["bits"][bits] = failure(exc)
                reporter.log(f"[yellow]ablation {name} {bits} failed:[/yellow] {exc}")
    return {
        "model": "all-MiniLM-L6-v2, every Linear and both attention matmuls quantized at the given bits",
        "protocol": "torch fake-quant model vs the FP32 torch model on the held-out sentences: mean/min cosine "
        "of mean-pooled embeddings and pairwise-similarity Spearman; 128 calibration sentences",
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }


def plot_minilm(res: dict[str, Any], path: Path) -> Path | None:
    """Embedding error vs speedup per variant (one panel per thread count and batch): where the trade-off
    sits is quicker to see than to read. Needs matplotlib (the ``plot`` extra); returns None without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [f"threads{t}_batch{b}" for t in THREADS for b in BATCHES]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.0), sharey=True)
    for ax, key in zip(axes, keys, strict=True):
        for name, v in res["variants"].items():
            lat, fid = (v.get("latency") or {}).get(key), v.get("fidelity")
            if not lat or not fid or name == BASELINE:
                continue
            err = max(1.0 - fid["fidelity_mean"], 1e-6)
            ours = name == OURS
            ax.scatter(lat["speedup_vs_fp32"], err, s=80 if ours else 40, marker="*" if ours else "o",
                       color="tab:red" if ours else "tab:blue", zorder=3)
            ax.annotate(name, (lat["speedup_vs_fp32"], err), textcoords="offset points", xytext=(5, 4), fontsize=8)
        t, b = key.removeprefix("threads").split("_batch")
        ax.set_title(f"{t} thread(s), batch {b}")
        ax.set_xlabel("speedup vs FP32 ONNX (higher is better)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("embedding error, 1 - mean cosine (lower is better)")
    fig.suptitle("MiniLM W8A8 on ONNX Runtime CPU: better is down and to the right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def print_ablation(con, res: dict[str, Any]) -> None:  # noqa: ANN001
    from rich.table import Table

    table = Table(title="MiniLM component ablation: fidelity mean (min), torch fake-quant, attention quantized")
    table.add_column("method")
    for bits in ABLATION_BITS:
        table.add_column(bits.upper(), justify="right")
    for name, row in res["rows"].items():
        cells = []
        for bits in ABLATION_BITS:
            v = row["bits"].get(bits) or {}
            cells.append(
                f"{v['fidelity_mean']:.4f} ({v['fidelity_min']:.4f})" if "fidelity_mean" in v else v.get("status", "-")
            )
        table.add_row(name, *cells)
    con.print(table)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = timing_parser(__doc__, RESULTS / "quantization.json", runs=10, min_time=0.5, threads=False)
    parser.add_argument("--no-nncf", action="store_true", help="skip NNCF (MiniLM and ViT)")
    parser.add_argument("--skip-vit", action="store_true", help="skip the digits ViT part")
    parser.add_argument("--skip-minilm", action="store_true", help="skip the MiniLM part")
    parser.add_argument("--skip-ablation", action="store_true", help="skip the MiniLM component ablation")
    parser.add_argument("--plot-from", type=Path, help="only redraw the plot from this results JSON")
    args = parse_timing_args(parser, argv)
    if args.plot_from:
        import json

        res = json.loads(args.plot_from.read_text())
        written = plot_minilm(res["minilm"], args.plot_from.with_suffix(".png"))
        console().print(f"wrote {written}" if written else "matplotlib is not installed (pip install matplotlib)")
        return 0

    from modelpress.bench import system_info, write_json_atomic
    from modelpress.progress import Reporter

    con = console()
    reporter = Reporter()
    started = time.perf_counter()
    system = system_info()
    result: dict[str, Any] = {
        "benchmark": "quantization",
        "quick": args.quick,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "system": system,
        "cpu_flags": system["cpu_flags"],
        "versions": {
            **system["versions"],
            "nncf": dist_version("nncf"),
            "modelpress": dist_version("modelpress"),
        },
    }
    with tempfile.TemporaryDirectory(prefix="modelpress-quantization-") as tmp:
        if not args.skip_minilm:
            result["minilm"] = run_minilm(args, Path(tmp), reporter)
        if not args.skip_vit:
            result["digits_vit"] = run_vit(args, Path(tmp), reporter)
        if not args.skip_ablation:
            result["minilm_ablation"] = run_minilm_ablation(args, Path(tmp), reporter)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if "minilm" in result:
        acc = result["minilm"]["acceptance"]
        result["summary"] = {
            k: acc.get(k)
            for k in ("ours", "passed", "ours_fastest", "ours_fastest_strict", "ours_most_faithful")
        }
        if "latency" in acc:
            result["summary"]["ours_vs_fastest_peer"] = {
                k: v["ours_vs_fastest_peer"] for k, v in acc["latency"].items()
            }
            result["summary"]["ours_vs_most_faithful_peer_fidelity_mean"] = acc["fidelity"][
                "ours_vs_peer_fidelity_mean"
            ]
    out = write_json_atomic(args.out, result)

    con.print(
        f"CPU: {system['cpu_model']} | flags: {' '.join(system['cpu_flags'])} | "
        f"{system['cores_available']} cores"
    )
    if "minilm" in result:
        print_minilm(con, result["minilm"])
        plot = plot_minilm(result["minilm"], Path(args.out).with_suffix(".png"))
        con.print(f"plot: {plot}" if plot else "plot skipped: pip install matplotlib (the plot extra)")
    if "digits_vit" in result:
        print_vit(con, result["digits_vit"])
    if "minilm_ablation" in result:
        print_ablation(con, result["minilm_ablation"])
    con.print(f"wrote {out} ({result['seconds']:.0f} s{', QUICK: smoke numbers' if args.quick else ''})")
    return 0


def print_minilm(con, res: dict[str, Any]) -> None:  # noqa: ANN001
    from rich.table import Table

    table = Table(title=f"MiniLM W8A8 on ort-cpu, sequence {SEQ} (speedups vs fp32; ms in brackets)")
    table.add_column("variant")
    for threads in THREADS:
        for b in BATCHES:
            table.add_column(f"{threads}t b{b}", justify="right")
    for col in ("file MB", "calib s", "fidelity mean (min)", "spearman", "int kernels"):
        table.add_column(col, justify="right")
    for name, e in res["variants"].items():
        if e.get("status") != "ok":
            table.add_row(
                name, *["-"] * (len(THREADS) * len(BATCHES)), "-", "-", e.get("status", ""), "-", "-"
            )
            continue
        lat = e.get("latency", {})
        cells = []
        for threads in THREADS:
            for b in BATCHES:
                s = lat.get(f"threads{threads}_batch{b}", {})
                cells.append(
                    f"{fmt(s.get('speedup_vs_fp32'), '.2f', 'x')} ({fmt(s.get('median_ms'), '.1f')})"
                )
        fid = e.get("fidelity", {})
        table.add_row(
            name,
            *cells,
            fmt(e.get("file_size_bytes", 0) / 1e6, ".1f"),
            fmt(e.get("calibration_seconds"), ".1f"),
            "-" if not fid else f"{fid['fidelity_mean']:.4f} ({fid['fidelity_min']:.4f})",
            fmt(fid.get("spearman"), ".4f"),
            fmt(e.get("integer_kernels"), "d"),
        )
    con.print(table)
    acc = res["acceptance"]
    if acc.get("passed") is None:
        con.print("acceptance: no peer measured")
        return
    for key, v in acc["latency"].items():
        con.print(
            f"  {key}: ours vs fastest peer ({v['fastest_peer']}) {v['ours_vs_fastest_peer']:.3f}x "
            f"-> fastest: {v['ours_fastest']} (strict {v['ours_fastest_strict']})"
        )
    f = acc["fidelity"]
    con.print(
        f"  fidelity: ours {f['ours_fidelity_mean']:.4f} vs most faithful peer ({f['most_faithful_peer']}) "
        f"{f['peer_fidelity_mean']:.4f}, error ratio {f['peer_error_over_ours']:.2f} -> most faithful: "
        f"{acc['ours_most_faithful']}"
    )
    con.print(
        f"acceptance ({acc['ours']}): fastest {acc['ours_fastest']} (strict {acc['ours_fastest_strict']}), "
        f"most faithful {acc['ours_most_faithful']} -> passed: {acc['passed']}"
        + (f"; peers missing: {acc['peers_missing']}" if acc["peers_missing"] else "")
    )


def print_vit(con, res: dict[str, Any]) -> None:  # noqa: ANN001
    from rich.table import Table

    table = Table(
        title=f"digits ViT: held-out accuracy ({res['evaluation_samples']} images; agreement with FP32)"
    )
    table.add_column("method")
    for bits in VIT_BITS:
        table.add_column(bits.upper(), justify="right")
    for name, row in res["rows"].items():
        if name == "fp32":
            table.add_row(name, *[f"{row['accuracy']:.4f}"] * len(VIT_BITS))
            continue
        cells = []
        for bits in VIT_BITS:
            v = row["bits"].get(bits)
            if isinstance(v, str):
                cells.append("n/a")
            elif not v or "accuracy" not in v:
                cells.append((v or {}).get("status", "-"))
            else:
                cells.append(f"{v['accuracy']:.4f} ({v.get('agreement', float('nan')):.3f})")
        table.add_row(name, *cells)
    con.print(table)
    onnx_rows = res.get("onnx", {})
    fp32 = onnx_rows.get("fp32", {}).get("accuracy_onnx")
    con.print(
        f"W8A8 QDQ ONNX in ONNX Runtime on this CPU (VNNI: {res['cpu_has_vnni']}; FP32 ONNX "
        f"{fmt(fp32, '.4f')}):"
    )
    for name, q in onnx_rows.items():
        if name == "fp32" or not q:
            continue
        if "accuracy" in q:
            speed = ", ".join(f"b{sh['batch']} {sh['speedup']:.2f}x" for sh in q.get("latency", []))
            con.print(
                f"  {name}: accuracy {q['accuracy']:.4f} (torch fake-quant "
                f"{q['torch_fake_quant_accuracy']:.4f}, agreement with FP32 {q['agreement']:.3f}, cosine to "
                f"torch {q['qdq_vs_torch_fake_quant']['min_cosine']:.4f}), {q['integer_kernels']} integer "
                f"kernels" + (f", speed vs FP32 ONNX {speed}" if speed else "")
            )
        else:
            con.print(f"  {name}: {q.get('status')}: {q.get('reason', '')}")


if __name__ == "__main__":
    raise SystemExit(main())
