"""Peak memory of the QDQ (INT8) export of a large model (issues 20 and 22: peak <= 3x the FP32 weights): a
random-weight BERT-base quantized by ``quantize_model`` (RepQ, W8A8, min-max observers on one batch of 8 x 64
tokens: the export's memory does not depend on the calibration), then ``export_qdq`` (streamed: the model is
above ``STREAM_MIN_BYTES``) and ``verify_qdq`` against the torch model.

Each allocator setting runs in its own process: ``unmapped`` (what the ``modelpress`` command sets at start,
``system.unmap_large_blocks``) and ``default`` (glibc's dynamic mmap threshold). Reported per phase (RSS sampled
every 10 ms; phases: torch's trace, its ONNX conversion and serialization, the graph cleanup, the ORT fusion, the
checker, the verification): the peak over the FP32 weight bytes, and the export's growth above the resident set
of the quantized model before it.

    python benchmarks/qdq_memory.py            # writes benchmarks/results/qdq_memory.json

Run with ``PYTHONPATH`` pointing at another checkout's ``src`` and ``--label before`` to measure that code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("unmapped", "default")


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class _Sampler:
    def __init__(self) -> None:
        self.phase, self.peaks, self.stopped = "start", {}, False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stopped:
            self._note()
            time.sleep(0.01)

    def _note(self) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), _rss())

    def set(self, phase: str) -> None:
        self._note()
        self.phase = phase


def _wrap(sampler: _Sampler, owner: object, attr: str, phase: str) -> None:
    real = getattr(owner, attr, None)
    if real is None:
        return

    def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        before = sampler.phase
        sampler.set(phase)
        try:
            return real(*args, **kwargs)
        finally:
            sampler.set(before)

    setattr(owner, attr, wrapped)


def run_case(mode: str) -> dict:
    """One process: quantize, export and verify a random BERT-base; the peaks per phase."""
    if mode == "unmapped":
        try:
            from modelpress.system import unmap_large_blocks
        except ImportError:  # code from before the setting existed
            return {"mode": mode, "skipped": "modelpress.system.unmap_large_blocks does not exist in this code"}
        unmap_large_blocks()
    sampler = _Sampler()
    import onnx
    import torch
    from transformers import BertConfig, BertModel

    import modelpress.quantize.qdq as qdq
    from modelpress.graph import ModelGraph
    from modelpress.graph.inputs import InputSpec
    from modelpress.quantize import RepQConfig, quantize_model

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    graph = ModelGraph(model, InputSpec("text", ["input_ids", "attention_mask"], vocab_size=30000, default_seq_len=64))
    ids = torch.randint(0, 30000, (8, 64), generator=torch.Generator().manual_seed(0))
    sampler.set("quantize")
    quantize_model(graph.module, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], graph.norm_consumers(),
                   RepQConfig(act_observer="minmax", weight_observer="minmax", norm_observer="minmax"))
    for owner, attr, phase in ((torch.jit, "_get_trace_graph", "trace"), (torch._C, "_jit_pass_onnx", "onnx conversion"),
                               (torch._C.Graph, "_export_onnx", "serialize"), (onnx, "load", "onnx.load"),
                               (qdq, "cleanup", "cleanup"), (qdq, "fuse_for_ort", "fuse_for_ort"),
                               (onnx.checker, "check_model", "check_model"), (onnx, "save", "onnx.save")):
        _wrap(sampler, owner, attr, phase)
    sampler.set("before export")
    time.sleep(0.1)
    base = sampler.peaks["before export"]
    example, batches = qdq.export_examples(graph)
    with tempfile.TemporaryDirectory() as tmp:
        sampler.set("export_qdq")
        t0 = time.perf_counter()
        qdq.export_qdq(graph.module, example, Path(tmp) / "model.onnx", input_names=graph.input_spec.names,
                       dynamic_axes=graph.input_spec.dynamic_axes())
        seconds = time.perf_counter() - t0
        export_peak = max(v for k, v in sampler.peaks.items() if k not in ("start", "quantize", "before export"))
        sampler.set("verify")
        check = qdq.verify_qdq(Path(tmp) / "model.onnx", graph.module, batches)
        sampler.set("end")
    sampler.stopped = True
    return {"mode": mode, "fp32_weight_bytes": weights, "export_seconds": round(seconds, 1),
            "rss_before_export_bytes": base, "export_growth_bytes": export_peak - base,
            "export_growth_over_fp32_weights": round((export_peak - base) / weights, 2),
            "peak_over_fp32_weights": round(max(sampler.peaks.values()) / weights, 2),
            "peak_by_phase_over_fp32_weights": {k: round(v / weights, 2) for k, v in sampler.peaks.items()},
            "verify_min_cosine": check.get("min_cosine")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="after", help="key under which the results are stored")
    ap.add_argument("--case", choices=MODES, help=argparse.SUPPRESS)  # one case in this process
    ap.add_argument("--out", type=Path, default=RESULTS / "qdq_memory.json")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    rows = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--case", mode], capture_output=True, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode:
            raise SystemExit(f"{mode}: failed\n{out.stderr[-3000:]}")
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = rows[mode]
        if "skipped" in r:
            print(f"{mode:9s} skipped: {r['skipped']}")
            continue
        print(f"{mode:9s} export +{r['export_growth_over_fp32_weights']:.2f}x above the quantized model, "
              f"process peak {r['peak_over_fp32_weights']:.2f}x the FP32 weights, export {r['export_seconds']} s")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label] = {"model": "random-weight BERT-base (bert-base-uncased config), W8A8 RepQ",
                           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
