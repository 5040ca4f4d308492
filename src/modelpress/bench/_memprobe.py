"""Peak memory of one ONNX Runtime session, measured in a fresh process.

Run as a script (``python _memprobe.py CONFIG_JSON``), not imported: it imports only numpy and
onnxruntime, so the process baseline is small and the same for every variant. It resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``), reads VmRSS as the baseline after the inputs
are loaded, then creates the session and runs each shape (smallest first), reading VmHWM after each.
Reported numbers are MiB of peak resident memory above that baseline: weights, ORT's arenas and
activations together. It prints one JSON object on stdout.

This is the one place that builds an ONNX Runtime session without ``modelpress.targets`` (the session
factory everywhere else): importing modelpress would load torch into the process and its hundreds of
MiB into the baseline. The Target's providers, thread count and session config come in CONFIG_JSON and
are applied here as ``Target.session`` applies them (keep the two in step).
"""

from __future__ import annotations

import json
import sys


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    cfg = json.loads(sys.argv[1])
    import numpy as np
    import onnxruntime as ort

    data = np.load(cfg["inputs"])
    feeds = []
    for key in cfg["shapes"]:
        prefix = key + "::"
        feeds.append((key, {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}))
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(cfg["threads"])
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    for key, value in cfg.get("session_config", []):
        so.add_session_config_entry(key, value)
    reset = _reset_peak()
    base = _status_kb("VmRSS")
    out: dict = {"reset_peak": reset, "baseline_mb": None if base is None else base / 1024.0, "shapes": {}}
    kwargs = {"providers": cfg["providers"]}
    if cfg.get("provider_options"):
        kwargs["provider_options"] = cfg["provider_options"]
    sess = ort.InferenceSession(cfg["path"], so, **kwargs)
    hwm = _status_kb("VmHWM")
    if base is not None and hwm is not None:
        out["session_mb"] = (hwm - base) / 1024.0
    wanted = [i.name for i in sess.get_inputs()]
    for key, feed in feeds:
        for _ in range(2):
            sess.run(None, {k: feed[k] for k in wanted})
        hwm = _status_kb("VmHWM")
        out["shapes"][key] = None if base is None or hwm is None else (hwm - base) / 1024.0
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
