"""Weight-only INT4 (``quantize.weight_only``, MatMulNBits) against FP32, our W8A8 and ONNX Runtime's own
``MatMulNBitsQuantizer`` (RTN), in one interleaved run per model.

Models: ``gpt2`` (language_model.py's 1.07M-parameter GPT-2 trained on CPython's documentation topics; the
same held-out topics), ``minilm`` (all-MiniLM-L6-v2, the packaged sentences), ``llama`` (a random-weight
Llama-style decoder with grouped-query attention: size and speed only, its fidelity means little).

Variants: ``fp32`` (plain export), ``int8`` (our default recipe's quantize.repq W8A8, QDQ; not for llama),
``w4-rtn`` / ``w4-gptq`` / ``w4-awq`` (g32 asymmetric; LM head 8-bit, quantized once with a tied embedding;
MatMulNBits accuracy_level 4), ``w4-gptq-head4`` (the head 4-bit too), ``w4-gptq-level0`` (the same file with accuracy_level 0: float compute, the measured choice
of the level), ``w4-gptq-emb`` (MiniLM: the embedding tables packed too), ``ort-rtn`` (ONNX Runtime's
MatMulNBitsQuantizer on our FP32 export: block 32, asymmetric, accuracy_level 4; needs the ``onnx-ir`` package).

    python benchmarks/weight_only.py --model gpt2 [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, failure, quiet, recipe_options  # noqa: E402

SEQ = 128
THREADS = 2


def _save_size(graph: Any, folder: Path) -> int:
    from modelpress.models.saving import save

    with quiet():
        save(graph, folder)
    return (folder / "model.safetensors").stat().st_size


def _ort_rtn(fp32: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=32, is_symmetric=False, accuracy_level=4)
    q.process()
    out.parent.mkdir(parents=True, exist_ok=True)
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def _setup(model: str, tmp: Path, reporter: Any) -> tuple[Any, Any]:
    import numpy as np
    import torch

    import modelpress
    from modelpress.data import EmbeddingTask, LanguageModelTask, load_data
    from modelpress.data.sources import DataSplit, TaskData
    from modelpress.passes import Context
    from modelpress.targets import get_target

    if model == "gpt2":
        import language_model as lm

        splits = lm.corpus_splits()
        trained = lm.trained_model(splits, lm.TRAIN_STEPS, reporter)
        with quiet():
            graph = modelpress.load(trained["folder"])
        cal = lm.windows(graph.tokenizer, splits["calibration"])[: lm.N_CALIBRATION]
        ev = lm.windows(graph.tokenizer, splits["evaluation"])[:100]
        data = TaskData(calibration=lm.split_of(cal), evaluation=lm.split_of(ev), description=lm.CORPUS)
        task = LanguageModelTask()
    elif model == "minilm":
        with quiet():
            graph = modelpress.load()
        data = load_data(None, graph.input_spec, graph.tokenizer, n_calibration=128, n_evaluation=200, max_length=SEQ)
        task = EmbeddingTask()
    else:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(num_hidden_layers=6, hidden_size=512, intermediate_size=1536,
                                       num_attention_heads=8, num_key_value_heads=2, vocab_size=8192,
                                       max_position_embeddings=256, use_cache=False)
        folder = tmp / "llama-ckpt"
        transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
        with quiet():
            graph = modelpress.load(folder)
        rng = np.random.default_rng(0)

        def split(n: int, seed: int) -> DataSplit:
            ids = torch.from_numpy(np.random.default_rng(seed).integers(0, 8192, size=(n, SEQ)))
            return DataSplit([{"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8])}
                              for i in range(0, n, 8)])

        del rng
        data = TaskData(calibration=split(64, 1), evaluation=split(32, 2), description="random token ids")
        task = LanguageModelTask()
    ctx = Context(workdir=tmp / "ctx", task=task, data=data, target=get_target("ort-cpu", threads=THREADS),
                  reference=graph, seed=0, reporter=reporter)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    ctx.reference_outputs()
    return graph, ctx


def run(args: argparse.Namespace, tmp: Path, reporter: Any) -> dict[str, Any]:
    from modelpress.bench import get_target, measure
    from modelpress.export import export_onnx
    from modelpress.export.files import onnx_file_size
    from modelpress.quantize.passes import RepQPass
    from modelpress.quantize.qdq import ort_kernels
    from modelpress.quantize.weight_only_pass import WeightOnlyPass
    from modelpress.system import system_info

    started = time.perf_counter()
    graph, ctx = _setup(args.model, tmp, reporter)
    lm = args.model != "minilm"
    paths: dict[str, Path] = {}
    info: dict[str, dict[str, Any]] = {}
    with quiet():
        paths["fp32"] = Path(export_onnx(graph.module, graph.input_spec, tmp / "fp32" / "model.onnx",
                                         optimize="none").path)
    info["fp32"] = {"safetensors_bytes": _save_size(graph, tmp / "fp32-saved")}
    if args.model != "llama":
        t0 = time.perf_counter()
        with reporter.step("int8: quantize.repq (default recipe)"), quiet():
            r = RepQPass(recipe_options("default")).apply(graph, ctx)
            (tmp / "int8").mkdir()
            paths["int8"] = Path(ctx.export(r.graph, tmp / "int8" / "model.onnx", exporter=r.exporter).path)
        info["int8"] = {"seconds": round(time.perf_counter() - t0, 1),
                        "safetensors_bytes": _save_size(r.graph, tmp / "int8-saved")}
    variants = [("w4-rtn", {"method": "rtn"}), ("w4-gptq", {"method": "gptq"}), ("w4-awq", {"method": "awq"})]
    if args.model == "minilm":
        variants.append(("w4-gptq-emb", {"method": "gptq", "embeddings": "quantize"}))
    else:
        variants.append(("w4-gptq-head4", {"method": "gptq", "head_bits": 4}))
    for name, options in variants:
        opts = {"accuracy_level": 4, **({"head": "quantize", "head_bits": 8} if lm else {}), **options}
        t0 = time.perf_counter()
        with reporter.step(f"{name}: quantize.weight_only {opts}"), quiet():
            r = WeightOnlyPass(opts).apply(graph, ctx)
            (tmp / name).mkdir()
            exported = ctx.export(r.graph, tmp / name / "model.onnx", exporter=r.exporter)
        paths[name] = Path(exported.path)
        info[name] = {"seconds": round(time.perf_counter() - t0, 1), "options": opts,
                      "safetensors_bytes": _save_size(r.graph, tmp / f"{name}-saved"),
                      "mean_relative_output_error": r.metrics["mean_relative_output_error"],
                      "mean_relative_output_error_rtn": r.metrics["mean_relative_output_error_rtn"],
                      "export_check": exported.verification, "accuracy_level": exported.candidates}
        if name == "w4-gptq":
            import onnx

            from modelpress.quantize.weight_only_export import set_accuracy_level

            m = onnx.load(str(paths[name]))
            set_accuracy_level(m, 0)
            (tmp / "w4-gptq-level0").mkdir()
            onnx.save(m, str(tmp / "w4-gptq-level0" / "model.onnx"))
            paths["w4-gptq-level0"] = tmp / "w4-gptq-level0" / "model.onnx"
            info["w4-gptq-level0"] = {"options": {**opts, "accuracy_level": 0}}
    try:
        with reporter.step("ort-rtn: onnxruntime MatMulNBitsQuantizer"), quiet():
            paths["ort-rtn"] = _ort_rtn(paths["fp32"], tmp / "ort-rtn" / "model.onnx")
        info["ort-rtn"] = {"options": {"bits": 4, "block_size": 32, "is_symmetric": False, "accuracy_level": 4}}
    except Exception as exc:  # noqa: BLE001 - record why, measure the rest
        info["ort-rtn"] = failure(exc)
    for name, p in paths.items():
        entry = info.setdefault(name, {})
        entry["onnx_bytes"] = onnx_file_size(p)
        with reporter.step(f"quality of {name}"), quiet():
            entry["quality"] = {k: float(v) for k, v in ctx.evaluate(p).metrics.items()}
        k = ort_kernels(p, workdir=p.parent)
        entry["kernels"] = {op: k[op] for op in ("MatMulNBits", "MatMulIntegerToFloat", "MatMul", "Gather") if op in k}
    build = time.perf_counter() - started
    with reporter.step("latency (interleaved)"), quiet():
        report = measure(paths, graph.input_spec, get_target("ort-cpu", threads=THREADS), rounds=args.rounds,
                         runs=10, min_time_s=0.3, baseline="fp32", batch_sizes=[1, 8], seq_lens=[SEQ],
                         memory=False, reporter=reporter)
    for name in paths:
        e = info[name]
        e["size_vs_fp32_onnx"] = round(e["onnx_bytes"] / info["fp32"]["onnx_bytes"], 4)
        if "int8" in info:
            e["size_vs_int8_onnx"] = round(e["onnx_bytes"] / info["int8"]["onnx_bytes"], 4)
        if "safetensors_bytes" in e:
            e["safetensors_vs_fp32"] = round(e["safetensors_bytes"] / info["fp32"]["safetensors_bytes"], 4)
        for b in (1, 8):
            s = report.stats(name, b, SEQ)
            e[f"batch{b}"] = {"median_ms": round(s.median_ms, 3),
                              "speedup_vs_fp32": None if s.speedup is None else round(s.speedup, 3)}
    return {"model": args.model, "parameters": graph.num_parameters(), "system": system_info(THREADS),
            "protocol": f"variants built first, then timed interleaved (ort-cpu, {THREADS} threads, sequence {SEQ}, "
                        f"{args.rounds} rounds, fresh sessions per round, speedup = median of per-round ratios vs fp32); "
                        "quality in ONNX Runtime on held-out data against the FP32 torch model",
            "variants": info, "build_seconds": round(build, 1), "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    from modelpress.progress import Reporter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["gpt2", "minilm", "llama"], default="gpt2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or RESULTS / f"weight_only_{args.model}.json"
    with tempfile.TemporaryDirectory() as tmp:
        res = run(args, Path(tmp), Reporter())
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    for name, e in res["variants"].items():
        if "onnx_bytes" not in e:
            print(f"{name:16s} failed: {e.get('error')}")
            continue
        q = e["quality"]
        fid = q.get("next_token_kl", q.get("fidelity_mean"))
        vs_int8 = f", {e['size_vs_int8_onnx']:.3f}x int8" if "size_vs_int8_onnx" in e else ""
        print(f"{name:16s} onnx {e['onnx_bytes'] / 1e6:7.2f} MB ({e['size_vs_fp32_onnx']:.3f}x fp32{vs_int8}) "
              f"b1 {e['batch1']['speedup_vs_fp32']}x b8 {e['batch8']['speedup_vs_fp32']}x fidelity {fid}")


if __name__ == "__main__":
    main()
