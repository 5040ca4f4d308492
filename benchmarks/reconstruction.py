"""Reconstruction settings on the pretrained all-MiniLM-L6-v2 (issue 20): one hessian-pruned model, refit
several ways, held-out fidelity of each.

MiniLM is pruned once by ``prune.global`` (hessian, 0.5x of its predicted latency: ORT CPU, batch 1, sequence
128, 2 threads; one iteration, no reconstruction, no training), then each setting refits a copy with
``modelpress.reconstruct.reconstruct_graph``: ``SAMPLES:MODE:TARGET[:SCOPE]`` with SAMPLES train-split sentences added
to the 64 calibration sentences, MODE ``weights`` or ``scales`` and TARGET ``stream`` or ``layer``, SCOPE ``readers`` (default) or ``all``, and ``:rerun`` to time the refit that re-runs both models from their inputs for
every layer (before the staged refit; the same weights). Fidelity is
the EmbeddingTask's mean/min cosine on 200 held-out packaged sentences (torch). Writes
benchmarks/results/reconstruction.json.

    python benchmarks/reconstruction.py                                  # the default settings
    python benchmarks/reconstruction.py 0:weights:layer 512:weights:stream
    python benchmarks/reconstruction.py none --kinds head,mlp --label loop4 \
        --prune '{"iterations": 4, "reconstruct": true, "reconstruct_samples": 512}'   # refit inside the pass
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import RESULTS  # noqa: E402

DEFAULT = ("0:weights:layer", "0:weights:stream", "0:scales:layer", "0:scales:stream", "512:weights:stream")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", default=list(DEFAULT))
    parser.add_argument("--out", type=Path, default=RESULTS / "reconstruction.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prune", default="", help="JSON overrides of the prune.global config, e.g. "
                        "'{\"iterations\": 4, \"reconstruct\": true}' refits inside the pass after every iteration "
                        "(the ranking then sees the repaired model); the row is the pass's own result")
    parser.add_argument("--label", default="", help="record this run under runs[LABEL] of --out (merged with the "
                        "runs already there) instead of overwriting the file")
    parser.add_argument("--kinds", default="", help="what prune.global may remove, comma-separated (default: the "
                        "pass's kinds; e.g. head,mlp keeps the residual width and every block)")
    args = parser.parse_args(argv)

    import modelpress
    from modelpress.bench import build_latency_table, get_target
    from modelpress.data import EmbeddingTask, load_data
    from modelpress.passes import Context, registered_passes
    from modelpress.progress import Reporter
    from modelpress.reconstruct import reconstruct_graph
    from modelpress.system import load_average

    target = get_target("ort-cpu", 2)
    original = modelpress.load()
    data = load_data(None, original.input_spec, original.tokenizer, n_evaluation=200, max_length=128)
    table = build_latency_table(original, target, batch=1, seq=128)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"modelpress-recon-bench-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(workdir=work, task=EmbeddingTask(), data=data, target=target, reference=original, seed=args.seed,
                  reporter=Reporter(quiet=True), latency_model=table)

    def fidelity(graph) -> dict:  # noqa: ANN001
        m = ctx.evaluate(graph, torch_only=True).metrics
        return {k: round(float(m[k]), 4) for k in ("fidelity_mean", "fidelity_min", "spearman") if k in m}

    config = {"saliency": "hessian", "target": "latency", "ratio": 0.5, "iterations": 1, "batches": 16,
              "measure": False, "reconstruct": False}  # the pass reconstructs by default: refit here instead
    if args.kinds:
        config["kinds"] = [k.strip() for k in args.kinds.split(",") if k.strip()]
    config.update(json.loads(args.prune) if args.prune else {})
    load, t0 = load_average(), time.perf_counter()
    result = registered_passes()["prune.global"](config).apply(original, ctx)
    pruned = result.graph
    out = {"model": "sentence-transformers/all-MiniLM-L6-v2", "prune": config,
           "predicted_speedup": table.predict(original) / table.predict(pruned), "load_before": load,
           "prune_seconds": round(time.perf_counter() - t0, 1), "widths": result.metrics["widths"],
           "unrefit": fidelity(pruned), "settings": {},
           "iterations": [_iteration(it) for it in result.metrics["iterations"]]}
    print("widths", out["widths"], flush=True)
    print("pruned (the pass's result)", out["unrefit"], out["prune_seconds"], "s", flush=True)
    if args.label:
        out["command"] = shlex.join(["python", "benchmarks/reconstruction.py",
                                      *(argv if argv is not None else sys.argv[1:])])
    train = ctx.train
    for setting in [s for s in args.settings if s != "none"]:  # "none": only the pass's own result
        samples, mode, tgt, *which = setting.split(":")
        batches, extra = list(data.calibration.batches), 0
        for b in train.batches:
            if extra >= int(samples):
                break
            batches.append(b)
            extra += len(next(iter(b.values())))
        graph = pruned.copy()
        load, t0 = load_average(), time.perf_counter()
        r = reconstruct_graph(original, graph, batches, mode=mode, residual=tgt == "stream",
                              scope=which[0] if which else "readers", staged="rerun" not in which[1:])
        out["settings"][setting] = {"train_samples": extra, "mode": mode, "target": tgt, "scope": r["scope"],
                                    "staged": "rerun" not in which[1:],
                                    "seconds": round(time.perf_counter() - t0, 1), "load": [load, load_average()],
                                    **fidelity(graph),
                                    "error_after_mean": r.get("error_after_mean")}
        print(setting, out["settings"][setting], flush=True)
        out["load_after"] = load_average()
        _save(args, out)  # after every setting: a long run stopped early keeps what it measured
    out["load_after"] = load_average()
    _save(args, out)
    print(f"wrote {args.out}")
    return 0


def _iteration(it: dict) -> dict:
    """One iteration of the pass, short: units removed, the latency reached, the refit's mean errors."""
    r = it.get("reconstruct") or {}
    return {"removed_units": sum(it.get("removed_units", {}).values()), "latency": it.get("latency"),
            **{k: r[k] for k in ("error_before_mean", "error_after_mean", "refit") if k in r},
            **({"skipped": len(r["skipped"])} if r.get("skipped") else {})}


def _save(args: argparse.Namespace, out: dict) -> None:
    """Write ``out`` to ``args.out``, or, with a label, merge it into that file's ``runs`` (re-read each time: two
    labelled runs may write the same file)."""
    if not args.label:
        _write(args.out, out)
        return
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc.setdefault("runs", {})[args.label] = out
    _write(args.out, doc)


def _write(path: Path, out: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
