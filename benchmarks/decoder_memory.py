"""Peak memory of the cached-decoder export (issue 22: 1B-parameter models within 24 GB): a random-weight
Llama-style LM (default ~1B parameters: hidden 2048, 16 layers, vocabulary 32000) exported by
``export_decoder`` with fused attention and with plain ops, each form in its own process. Reported: the
process's peak resident set (``VmHWM``) over the FP32 weight bytes, and the export's own peak above the
resident set right before it (the loaded model and the imports), without the verification against torch
(``verify=False``: it runs torch ``generate``, whose memory is not the export's).

    python benchmarks/decoder_memory.py                 # writes benchmarks/results/decoder_memory.json
    python benchmarks/decoder_memory.py --small         # a 1/16 model: a quick look

Run with ``PYTHONPATH`` pointing at another checkout's ``src`` and ``--label before`` to measure that code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16, "num_attention_heads": 16,
                 "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 256},
    "llama-small": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
                    "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 256},
}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _one(case: str, form: str) -> dict:
    """Export one form in this process and return its row."""
    import torch
    import transformers

    from modelpress.export.decoder import export_decoder

    torch.manual_seed(0)
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS[case])).eval()
    model.config.use_cache = False
    weights = sum(p.numel() for p in model.parameters()) * 4
    before = _status("VmRSS")
    started = time.perf_counter()
    row: dict = {"case": case, "form": form, "params": weights // 4, "fp32_weight_bytes": weights,
                 "rss_before_export_bytes": before}
    with tempfile.TemporaryDirectory(prefix="decoder-memory-") as tmp:
        try:
            result = export_decoder(model, Path(tmp) / "decoder.onnx", verify=False, fused=form == "fused")
            row["attention"] = result.attention.get("form")
            row["file_bytes"] = result.file_size_bytes
        except Exception as exc:  # the row says why: a failed export is a result too
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    peak = _status("VmHWM")
    row.update(peak_rss_bytes=peak, peak_over_fp32_weights=round(peak / weights, 2),
               export_peak_above_model_over_fp32_weights=round((peak - before) / weights, 2),
               seconds=round(time.perf_counter() - started, 1))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="the 1/16 model instead of the 1B one")
    ap.add_argument("--label", default="after", help="key the rows are stored under (before / after)")
    ap.add_argument("--out", type=Path, default=RESULTS / "decoder_memory.json")
    ap.add_argument("--one", nargs=2, metavar=("CASE", "FORM"), help=argparse.SUPPRESS)  # a child's own row
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(*args.one)))
        return
    case = "llama-small" if args.small else "llama-1b"
    rows = []
    for form in ("fused", "plain"):
        done = subprocess.run([sys.executable, __file__, "--one", case, form], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
        if done.returncode != 0:
            rows.append({"case": case, "form": form, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{case} {form}: peak {r.get('peak_over_fp32_weights', '-')}x the FP32 weights, export "
              f"+{r.get('export_peak_above_model_over_fp32_weights', '-')}x above the model"
              f"{', error: ' + r['error'] if 'error' in r else ''}")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault(case, {})[args.label] = {"rows": rows, "command": " ".join(sys.argv),
                                                "pythonpath": os.environ.get("PYTHONPATH", "")}
    tmp = args.out.with_suffix(".partial.json")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
