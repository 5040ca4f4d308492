"""Targets: does measuring through the agent add bias, and what do CUDA and TensorRT give on a GPU.

Part ``loopback`` (any machine): MiniLM FP32 and ORT dynamic INT8 (per-channel MatMul) timed on this machine
in-process and through a `modelpress agent` on 127.0.0.1 (same CPU, same threads), alternating local and remote
rounds. The INT8/FP32 speedup measured remotely must agree with the local one within the noise of the local
per-round speedups (the agent adds no bias); the remote/local FP32 latency ratio is recorded too.

Part ``gpu`` (only where ONNX Runtime offers CUDAExecutionProvider; skipped otherwise): MiniLM FP32 on the
CUDA provider, FP16 (TensorRT provider with FP16 enabled), and modelpress's ``int8`` recipe exported for
TensorRT (explicit-precision QDQ, ``--target tensorrt``) on the TensorRT provider, against FP32 CUDA, each
verified against torch's FP32 output (cosine). One command on a GPU machine with the ``tensorrt`` extra:

    python benchmarks/targets.py --parts gpu       # the GPU table, written into benchmarks/results/targets.json
    python benchmarks/targets.py                   # both parts (5 rounds)
    python benchmarks/targets.py --quick           # a smoke run (1 round, few runs)
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, console, parse_timing_args, run_parts, timing_parser  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
BATCHES = [1, 8]
SEQ = 128


def _minilm_files(tmp: Path, reporter: Any) -> tuple[Any, dict[str, Path]]:
    """MiniLM FP32 (modelpress export, verified) and its ORT dynamic INT8 (per-channel MatMul)."""
    import modelpress
    from modelpress.export import export_onnx

    graph = modelpress.load()
    fp32 = Path(export_onnx(graph.module, graph.input_spec, tmp / "fp32.onnx", optimize="none", reporter=reporter).path)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = tmp / "int8.onnx"
    quantize_dynamic(str(fp32), str(int8), per_channel=True, op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8)
    return graph, {"fp32": fp32, "int8": int8}


def _start_agent(threads: int, tmp: Path) -> tuple[subprocess.Popen, str, Path]:
    token = tmp / "token"
    token.write_text(secrets.token_urlsafe(24))
    token.chmod(0o600)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "modelpress.agent", "--port", "0", "--threads", str(threads),
                             "--token-file", str(token), "--cache-dir", str(tmp / "agent-cache")],
                            stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    port = line.split("http://127.0.0.1:")[1].split()[0]
    return proc, f"remote:127.0.0.1:{port}", token


def loopback(args: Any, tmp: Path, reporter: Any) -> dict[str, Any]:
    """Local vs remote-on-loopback: per-round INT8/FP32 speedups and FP32 latencies, alternating sides."""
    from modelpress.bench import get_target, measure

    threads = args.threads or 1
    graph, files = _minilm_files(tmp, reporter)
    proc, remote_name, token = _start_agent(threads, tmp)
    os.environ["MODELPRESS_AGENT_TOKEN_FILE"] = str(token)
    try:
        sides = {"local": get_target("ort-cpu", threads), "remote": get_target(remote_name, threads)}
        if args.no_spin:
            sides = {k: t.with_session_config(**{"session.intra_op.allow_spinning": "0"}) for k, t in sides.items()}
        per: dict[str, dict[int, dict[str, list[float]]]] = {
            s: {b: {"speedup": [], "fp32_ms": [], "int8_ms": []} for b in BATCHES} for s in sides}
        digests: dict[str, Any] = {}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                rep = measure(files, graph.input_spec, sides[side], rounds=1, runs=args.runs,
                              min_time_s=args.min_time, batch_sizes=BATCHES, seq_lens=[SEQ], memory=False,
                              baseline="fp32", reporter=reporter)
                for b in BATCHES:
                    per[side][b]["speedup"].append(rep.speedup("int8", b, SEQ))
                    per[side][b]["fp32_ms"].append(rep.stats("fp32", b, SEQ).median_ms)
                    per[side][b]["int8_ms"].append(rep.stats("int8", b, SEQ).median_ms)
                if side == "remote":
                    digests = {n: v.output_digests for n, v in rep.variants.items()}
    finally:
        proc.terminate()
        proc.wait(30)
    rows = {}
    for b in BATCHES:
        loc, rem = per["local"][b], per["remote"][b]
        s_loc, s_rem = statistics.median(loc["speedup"]), statistics.median(rem["speedup"])
        spread = (max(loc["speedup"]) - min(loc["speedup"])) / 2 if len(loc["speedup"]) > 1 else None
        noise = max(0.05 * s_loc, spread or 0.0)
        rows[f"b{b}"] = {
            "int8_speedup_local": s_loc, "int8_speedup_remote": s_rem,
            "remote_over_local_speedup": s_rem / s_loc, "noise": noise,
            "agrees_within_noise": abs(s_rem - s_loc) <= noise,
            "fp32_ms_local": statistics.median(loc["fp32_ms"]), "fp32_ms_remote": statistics.median(rem["fp32_ms"]),
            "fp32_remote_over_local": statistics.median(rem["fp32_ms"]) / statistics.median(loc["fp32_ms"]),
            "rounds": {"local": loc, "remote": rem},
        }
    return {"threads": threads, "seq": SEQ, "variants": {"fp32": "modelpress export (optimize none)",
            "int8": "onnxruntime quantize_dynamic, per-channel QInt8, MatMul only"},
            "remote_digests": digests, "per_batch": rows,
            "protocol": "alternating rounds: one interleaved local measurement of fp32+int8, then one through the "
                        "agent (the order flips every round); speedup = median of per-round int8/fp32 ratios; "
                        "noise = max(5%, half the range of the local per-round speedups)"}


def _cosine_vs_torch(path: Path, target: Any, graph: Any, batch: int) -> float:
    import numpy as np
    import torch

    from modelpress.graph.inputs import primary_output

    feeds = graph.input_spec.make(batch, SEQ, seed=1)
    sess = target.session(path)
    wanted = [i.name for i in sess.get_inputs()]
    out = np.asarray(sess.run(None, {k: feeds[k] for k in wanted})[0], dtype=np.float64).reshape(batch, -1)
    with torch.inference_mode():
        ref = primary_output(graph.module(**{k: torch.from_numpy(v) for k, v in feeds.items()}))
    ref = ref.double().numpy().reshape(batch, -1)
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    return float(cos.min())


def gpu(args: Any, tmp: Path, reporter: Any) -> dict[str, Any]:
    """FP32 CUDA, FP16 (TensorRT), TensorRT INT8 from the int8 recipe; speedups vs FP32 CUDA per round."""
    import dataclasses

    import onnxruntime as ort

    from modelpress.bench import get_target, measure

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return {"skipped": f"no CUDAExecutionProvider in this ONNX Runtime ({', '.join(providers)}): "
                           "run `python benchmarks/targets.py --parts gpu` on a GPU machine with the tensorrt extra"}
    graph, files = _minilm_files(tmp, reporter)
    cuda = get_target("ort-cuda")
    variants: dict[str, tuple[Path, Any]] = {"fp32-cuda": (files["fp32"], cuda)}
    notes: list[str] = []
    if "TensorrtExecutionProvider" in providers:
        trt = get_target("tensorrt")
        cache = {"trt_max_workspace_size": 2**31}
        variants["fp32-tensorrt"] = (files["fp32"], dataclasses.replace(trt, provider_options=(cache, {}, {})))
        variants["fp16-tensorrt"] = (files["fp32"], dataclasses.replace(
            trt, provider_options=({**cache, "trt_fp16_enable": True}, {}, {})))
        out = tmp / "int8-trt"
        proc = subprocess.run([sys.executable, "-m", "modelpress.cli", "compress", "--recipe", "int8", "--target",
                               "tensorrt", "-o", str(out), "-q", "--json"], capture_output=True, text=True,
                              timeout=3600, check=False)
        if proc.returncode == 0:
            variants["int8-tensorrt"] = (out / "model.onnx", dataclasses.replace(
                trt, provider_options=({**cache, "trt_int8_enable": True, "trt_fp16_enable": True}, {}, {})))
        else:
            notes.append("int8 recipe for tensorrt failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    else:
        notes.append("no TensorrtExecutionProvider: FP16 and INT8 TensorRT rows skipped")
    verified = {name: _cosine_vs_torch(path, tgt, graph, 8) for name, (path, tgt) in variants.items()}
    ms: dict[str, dict[int, list[float]]] = {n: {b: [] for b in BATCHES} for n in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            path, tgt = variants[name]
            rep = measure({name: path}, graph.input_spec, tgt, rounds=1, runs=args.runs, min_time_s=args.min_time,
                          batch_sizes=BATCHES, seq_lens=[SEQ], memory=False, reporter=reporter)
            for b in BATCHES:
                ms[name][b].append(rep.stats(name, b, SEQ).median_ms)
    rows = {}
    for name in names:
        rows[name] = {"min_cosine_vs_torch_fp32": verified[name]}
        for b in BATCHES:
            ratios = [f / m for f, m in zip(ms["fp32-cuda"][b], ms[name][b], strict=True)]
            rows[name][f"b{b}"] = {"median_ms": statistics.median(ms[name][b]),
                                   "speedup_vs_fp32_cuda": statistics.median(ratios), "round_ms": ms[name][b]}
    return {"variants": rows, "notes": notes, "providers": providers}


def main(argv: list[str] | None = None) -> None:
    parser = timing_parser(__doc__, RESULTS / "targets.json", runs=20, min_time=0.5)
    parser.add_argument("--parts", default="loopback,gpu", help="loopback, gpu, or both (comma-separated)")
    args = parse_timing_args(parser, argv)
    from modelpress.progress import Reporter

    rep = Reporter(quiet=False)
    results, out = run_parts("targets", "targets.py", argv, args, {"loopback": loopback, "gpu": gpu},
                             threads=args.threads or 1, dists=("onnxruntime", "onnxruntime-gpu", "tensorrt",
                                                                "starlette", "uvicorn"), reporter=rep)
    con = console()
    if "loopback" in results and "per_batch" in results["loopback"]:
        for key, row in results["loopback"]["per_batch"].items():
            con.print(f"{key}: INT8/FP32 speedup local {row['int8_speedup_local']:.2f}x, through the agent "
                      f"{row['int8_speedup_remote']:.2f}x (noise {row['noise']:.2f}; agree: {row['agrees_within_noise']}); "
                      f"FP32 remote/local latency {row['fp32_remote_over_local']:.2f}")
    gpu_result = results.get("gpu", {})
    if "skipped" in gpu_result:
        con.print(f"gpu: skipped ({gpu_result['skipped']})")
    for name, row in gpu_result.get("variants", {}).items():
        con.print(f"{name}: cosine vs torch {row['min_cosine_vs_torch_fp32']:.4f}; " + "; ".join(
            f"{b} {row[b]['median_ms']:.2f} ms ({row[b]['speedup_vs_fp32_cuda']:.2f}x)" for b in ("b1", "b8")))
    con.print(f"wrote {out}" + (" (QUICK: smoke numbers)" if args.quick else ""))


if __name__ == "__main__":
    main()
