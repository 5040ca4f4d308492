"""MiniLM W8A8 measurement (not a test): RepQ QDQ export vs ORT dynamic INT8 vs FP32 on ONNX Runtime CPU.

    HF_HUB_OFFLINE=1 python tests/quantize/bench_minilm.py [--nncf] [--out DIR]

Variants: FP32 (torch.onnx export, eager attention), ORT dynamic INT8 (per-channel, MatMul only),
optionally NNCF (quantize.nncf pass), and quantize.repq W8A8 with GPTQ: full range ("repq-w8"), with the
most sensitive layer kept float ("repq-w8-auto1") and with 7-bit weights for CPUs without VNNI
("repq-w7"). Fidelity: mean (min) cosine of mean-pooled embeddings against the FP32 ONNX model on 200
held-out sentences (English docstrings of the Python standard library; calibration: 128 others). Latency: 2 threads,
sequence 128, batch 1 and 8, all variants built first then timed interleaved (3 rounds, fresh sessions),
medians per round, median of per-round ratios. Prints JSON lines and writes DIR/minilm_w8a8.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import random
import re
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def sentences(n: int = 400, seed: int = 0) -> list[str]:
    mods = "json collections argparse logging pathlib subprocess threading asyncio email csv sqlite3 unittest doctest"
    mods += (
        " inspect typing dataclasses functools itertools statistics decimal fractions random shutil tarfile"
    )
    mods += " zipfile socket ssl datetime calendar textwrap string difflib pickle copy heapq bisect enum contextlib"
    mods += (
        " abc io os tempfile glob fnmatch configparser hashlib hmac secrets uuid base64 struct codecs locale"
    )
    mods += " gettext pdb profile timeit trace tracemalloc gc weakref types operator numbers math cmath queue sched"
    mods += " select selectors signal mmap wave colorsys smtplib ftplib poplib imaplib mailbox mimetypes zlib gzip"
    mods += " bz2 lzma http.client urllib.request xml.dom.minidom xml.etree.ElementTree html.parser"
    out = []
    for name in mods.split():
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001
            continue
        for o in [mod] + [getattr(mod, a) for a in dir(mod) if not a.startswith("_")]:
            doc = getattr(o, "__doc__", None)
            if isinstance(doc, str):
                out += [
                    s
                    for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split()))
                    if 30 <= len(s) <= 300 and s[0].isupper()
                ]
    out = sorted(set(out))
    random.Random(seed).shuffle(out)
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nncf", action="store_true", help="also the NNCF baseline (slow to build)")
    ap.add_argument("--out", default="/tmp/modelpress-bench")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import modelpress
    from modelpress.export.qdq import export_qdq, integer_kernel_count, ort_kernels
    from modelpress.quantize.repq import RepQConfig, quantize_model

    g = modelpress.load()
    tok = g.tokenizer
    s = sentences(400)

    def enc(texts: list[str], bs: int) -> list[dict[str, torch.Tensor]]:
        return [
            dict(tok(texts[i : i + bs], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(texts), bs)
        ]

    cal, ev = enc(s[:128], 8), enc(s[200:400], 16)
    ex = {k: torch.from_numpy(v) for k, v in g.input_spec.make(1, 16).items()}
    files = {"fp32": out / "fp32.onnx", "ort-dynamic": out / "dyn.onnx"}
    export_qdq(g.module, ex, files["fp32"])
    quantize_dynamic(
        str(files["fp32"]),
        str(files["ort-dynamic"]),
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        weight_type=QuantType.QInt8,
    )
    if args.nncf:
        import modelpress.quantize.passes  # noqa: F401
        from modelpress.compress.passes import PASSES
        from modelpress.compress.reporter import QUIET
        from modelpress.data.sources import DataSplit

        class Ctx:
            workdir, reporter, calibration = out, QUIET, DataSplit(batches=cal)

        files["nncf"] = PASSES["quantize.nncf"]({"samples": 128}).apply(files["fp32"], Ctx()).onnx_path
    variants = {
        "repq-w8": RepQConfig(reconstruction="gptq"),
        "repq-w8-auto1": RepQConfig(reconstruction="gptq", auto_float=1),
        "repq-w7": RepQConfig(reconstruction="gptq", weight_reduce_range=True),
    }
    info: dict = {}
    for name, cfg in variants.items():
        m = copy.deepcopy(g.module)
        t = time.time()
        r = quantize_model(m, cal, g.norm_consumers(), cfg)
        files[name] = out / f"{name}.onnx"
        export_qdq(m, ex, files[name])
        k = ort_kernels(files[name])
        info[name] = {
            "quantize_s": round(time.time() - t, 1),
            "integer_kernels": integer_kernel_count(k),
            "kept_float": r.metrics.get("auto_float", {}).get("kept_float", []),
            "kernels": dict(k),
        }

    def session(p: Path) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 2, 1, 3
        return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])

    def embed(p: Path) -> torch.Tensor:
        sess, rows = session(p), []
        for b in ev:
            h = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in b.items()})[0])
            mask = b["attention_mask"].unsqueeze(-1).float()
            rows.append((h * mask).sum(1) / mask.sum(1))
        return torch.cat(rows)

    ref = embed(files["fp32"])
    result = {
        "cpu_vnni": "avx512_vnni" in Path("/proc/cpuinfo").read_text(),
        "ort": ort.__version__,
        "variants": {},
    }
    for name, p in files.items():
        cos = torch.nn.functional.cosine_similarity(ref, embed(p), dim=-1)
        result["variants"][name] = {
            "fidelity_mean": float(cos.mean()),
            "fidelity_min": float(cos.min()),
            **info.get(name, {}),
        }
    rng = np.random.default_rng(0)
    for bs, reps in ((1, 20), (8, 4)):
        ids = rng.integers(1000, 29000, size=(bs, 128)).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        rounds: dict[str, list[float]] = {k: [] for k in files}
        for _ in range(3):
            for name, p in files.items():
                sess = session(p)
                for _ in range(3):
                    sess.run(None, feed)
                ts = []
                for _ in range(reps):
                    t = time.perf_counter()
                    sess.run(None, feed)
                    ts.append(time.perf_counter() - t)
                rounds[name].append(statistics.median(ts))
        for name, r in rounds.items():
            v = result["variants"][name]
            v[f"batch{bs}_ms"] = round(statistics.median(r) * 1000, 2)
            v[f"batch{bs}_speedup_vs_fp32"] = round(
                statistics.median(a / b for a, b in zip(rounds["fp32"], r, strict=True)), 3
            )
            v[f"batch{bs}_speedup_vs_dynamic"] = round(
                statistics.median(a / b for a, b in zip(rounds["ort-dynamic"], r, strict=True)), 3
            )
    (out / "minilm_w8a8.json").write_text(json.dumps(result, indent=1))
    for name, v in result["variants"].items():
        print(json.dumps({"variant": name, **{k: x for k, x in v.items() if k != "kernels"}}))


if __name__ == "__main__":
    main()
