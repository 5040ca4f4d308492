"""MatMulNBits accuracy_level 0 (float compute) and 4 (int8 compute) against a float MatMul, one op at a time.

4-bit asymmetric weights in blocks of 32 (packed by modelpress.quantize.weight_only_pack), ONNX Runtime CPU at 2
threads, one row (a decode step) and 128 rows (a full sequence); 5 rounds with fresh sessions, the three
variants timed in turn within each round; speedup = median over rounds of float-MatMul time / variant time.
Writes benchmarks/results/weight_only_matmulnbits_levels.json.

    python benchmarks/weight_only_levels.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from modelpress.quantize.weight_only_pack import WeightOnlyLinear, block_params, quantize_codes  # noqa: E402
from modelpress.system import system_info  # noqa: E402

SHAPES = [(128, 512), (384, 1536), (1536, 384), (2048, 2048), (2048, 5632)]


def model(k: int, n: int, level: int | None) -> bytes:
    """One MatMulNBits (``level``) or, with None, one float MatMul of a seeded [n, k] weight."""
    w = torch.from_numpy(np.random.default_rng(0).standard_normal((n, k)).astype(np.float32))
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])
    if level is None:
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
        inits = [onnx.numpy_helper.from_array(w.t().contiguous().numpy(), "W")]
    else:
        s, z = block_params(w, 4, 32, False)
        layer = WeightOnlyLinear(k, n, 4, 32, False, bias=False)
        layer.set_codes(quantize_codes(w, s, z, 4, 32), s, z)
        inits = [onnx.numpy_helper.from_array(t.numpy(), name)
                 for t, name in ((layer.qweight, "B"), (layer.scales, "S"), (layer.zero_points, "Z"))]
        node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n,
                                bits=4, block_size=32, accuracy_level=level)
    m = helper.make_model(helper.make_graph([node], "g", [a], [y], inits),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString()


def session(data: bytes) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = 2, 1
    return ort.InferenceSession(data, o, providers=["CPUExecutionProvider"])


def median_time(s: ort.InferenceSession, x: np.ndarray, runs: int = 30) -> float:
    for _ in range(3):
        s.run(None, {"A": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, {"A": x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    info = system_info(2)
    out = {"system": {k: info[k] for k in ("cpu_model", "cpu_flags", "load_average_1min", "versions")}, "shapes": {}}
    for k, n in SHAPES:
        for rows in (1, 128):
            x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
            ratios: dict[str, list[float]] = {"level0": [], "level4": []}
            for _ in range(5):
                sessions = {"fp32": session(model(k, n, None)), "level0": session(model(k, n, 0)),
                            "level4": session(model(k, n, 4))}
                times = {name: median_time(s, x) for name, s in sessions.items()}
                for lv, r in ratios.items():
                    r.append(times["fp32"] / times[lv])
            res = {lv: round(statistics.median(v), 3) for lv, v in ratios.items()}
            out["shapes"][f"M{rows} K{k} N{n}"] = res
            print(f"M={rows:4d} K={k:5d} N={n:5d} speedup vs float MatMul: level0 {res['level0']:.2f}x "
                  f"level4 {res['level4']:.2f}x", flush=True)
    (HERE / "results" / "weight_only_matmulnbits_levels.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
