"""INT8 on convolutional networks: modelpress's default recipe against ONNX Runtime static QDQ and NNCF.

One interleaved timing run per model, all written to benchmarks/results/cnn.json (with the CPU's
instruction-set flags) and a markdown table for the README, benchmarks/results/cnn.md.

Models (random weights drawn from seed 0: pretrained weights cannot be downloaded here): torchvision
ResNet-18, ResNet-50, MobileNetV2, MobileNetV3-Small, EfficientNet-B0, RegNet-X-800MF, ConvNeXt-Tiny; timm
MobileViT-XXS and LeViT-128S (hybrids, when timm is installed); and the modelpress zoo's digits CNN
(trained on scikit-learn digits, ``modelpress.train.zoo:digits_cnn_factory``). The random-weight models'
BatchNorm statistics are re-estimated on a third draw of ``--bn-stats`` crops (64; weights untouched):
with their initial statistics the activations of random MobileNets and EfficientNet vanish (logits near
1e-10), where fidelity and quantization ranges say little. Every variant, modelpress's included, starts
from that same module. Top-1 agreement of random-weight models is weak evidence (their logits put most
crops in a few classes: ``fp32_distinct_top1_classes``); the logit cosine is the fidelity measure.

Data: crops of scikit-learn's two sample photos (china.jpg, flower.jpg): random resized crops (10-100% of
the area, aspect 3/4-4/3) with random horizontal flips, resized to the model's input size and normalized
with the model's mean/std (ImageNet for torchvision). ``--calibration`` crops (64) calibrate every
quantizer; a disjoint draw of ``--fidelity`` crops (64) measures fidelity. The digits CNN calibrates on
the 128 samples ``--data digits`` gives the CLI and is scored on the 359 held-out digits.

Variants per model:

- ``fp32``: ``export_onnx(optimize="none")``, opset 17 (the file the peers quantize, and the file the
  pipeline exports as the original),
- ``ort-static``: ``quant_pre_process`` (BatchNorm folding, shape inference; when its symbolic shape
  inference fails, again with ``skip_symbolic_shape=True``, recorded) then ``quantize_static`` (QDQ,
  per-channel, QUInt8 activations, QInt8 weights, MinMax, ``reduce_range`` on CPUs without VNNI),
- ``nncf``: ``nncf.quantize`` on the FP32 ONNX ModelProto (default preset, the same calibration),
- ``modelpress``: the built-in ``default`` recipe run by ``Pipeline`` exactly as ``modelpress compress
  MODEL`` runs it (seed 0, target ort-cpu at ``--threads``), calibrated on the same crops (handed over as
  a TaskData, as ``--data tensors:FILE.npz`` would; see ``MODELPRESS_DATA``), its exported INT8 ONNX.

Every file is built first, then the variants of one model are timed interleaved (round-robin, fresh
sessions every round, warm-up, median of per-round medians, speedups as the median of per-round ratios
against ``fp32``) at 2 threads, batch 1 and 8. Fidelity: cosine of each variant's logits to the FP32
ONNX logits (mean and min over the fidelity crops) and top-1 agreement; for the digits CNN, accuracy.
The kernels ONNX Runtime runs (its optimized graph) are counted for every file.

Verdict per model: modelpress at least as fast as ort-static (per batch), at least as faithful (mean
cosine; accuracy for digits), and never slower than fp32.

    python benchmarks/cnn.py                          # the full run
    python benchmarks/cnn.py --quick                  # smoke: resnet18 + digits CNN, 1 round, 3 runs
    python benchmarks/cnn.py --models resnet18,mobilenet_v2 --batches 1,8 --rounds 5 --no-nncf
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, console, dist_version, failure, fmt, quiet  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASELINE = "fp32"
OURS = "modelpress"
VARIANTS = (BASELINE, "ort-static", "nncf", OURS)
DIGITS = "digits_cnn"
MODELS: dict[str, str] = {
    "resnet18": "torchvision:resnet18",
    "resnet50": "torchvision:resnet50",
    "mobilenet_v2": "torchvision:mobilenet_v2",
    "mobilenet_v3_small": "torchvision:mobilenet_v3_small",
    "efficientnet_b0": "torchvision:efficientnet_b0",
    "regnet_x_800mf": "torchvision:regnet_x_800mf",
    "convnext_tiny": "torchvision:convnext_tiny",
    "mobilevit_xxs": "timm:mobilevit_xxs",
    "levit_128s": "timm:levit_128s",
    DIGITS: "modelpress.train.zoo:digits_cnn_factory",
}
QUICK_MODELS = ("resnet18", DIGITS)
KERNELS = ("QLinearConv", "QLinearAdd", "Conv", "DequantizeLinear", "QuantizeLinear", "BatchNormalization")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NOISE_TOLERANCE = 0.03  # "at least as fast": >= 0.97x (the strict verdicts are kept beside)
RECIPE = "default"
MODELPRESS_DATA = (
    "the recipe's Context gets the same calibration crops as the peers (batches of 16) and the fidelity crops "
    "as its evaluation split; the CLI cannot pick that split from one file (--data tensors:FILE.npz draws "
    "128 calibration / 200 evaluation samples from it), and --data images:DIR would feed torchvision models "
    "unnormalized [0, 1] pixels (no image processor), unlike the peers' ImageNet-normalized crops"
)


# ------------------------------------------------------------------------------------------------ data


def photo_crops(n: int, size: tuple[int, int], mean, std, seed: int) -> Any:  # noqa: ANN001, ANN401
    """``n`` random resized crops (with flips) of scikit-learn's sample photos, [n, 3, H, W] float32."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(img) for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size[0], size[1]), dtype=np.float32)
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        for _ in range(20):  # torchvision's RandomResizedCrop rule: area 10-100 %, aspect 3/4-4/3
            area = rng.uniform(0.1, 1.0) * w * h
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            cw, ch = min(w, h), min(w, h)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out[i] = (arr - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    return out


def model_data(key: str, graph, args: argparse.Namespace) -> dict[str, Any]:  # noqa: ANN001
    """Calibration and fidelity arrays of one model (and labels for digits), with a description."""
    import numpy as np

    if key == DIGITS:
        from modelpress.data import load_data

        data = load_data("digits", graph.input_spec, n_calibration=128, n_evaluation=None, seed=0)
        name = graph.input_spec.names[0]
        cal = np.concatenate([b[name] for b in data.calibration.numpy_batches()])
        fid = np.concatenate([b[name] for b in data.evaluation.numpy_batches()])
        return {"calibration": cal, "fidelity": fid, "labels": data.evaluation.all_labels(),
                "description": data.description + " (what --data digits gives the CLI)"}
    shape = tuple(int(s) for s in graph.input_spec.shape)
    cfg = getattr(graph.module, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", IMAGENET[0])), tuple(cfg.get("std", IMAGENET[1]))
    cal = photo_crops(args.calibration, shape[1:], mean, std, seed=1)
    fid = photo_crops(args.fidelity, shape[1:], mean, std, seed=2)  # another stream: disjoint draws
    return {"calibration": cal, "fidelity": fid, "labels": None,
            "description": f"random resized crops (+flips) of scikit-learn's china.jpg and flower.jpg at "
            f"{shape[1]}x{shape[2]}, normalized with mean {mean} std {std}: {len(cal)} calibration "
            f"(seed 1), {len(fid)} fidelity (seed 2)"}


def recalibrate_batchnorm(module, x, batch: int = 16) -> int:  # noqa: ANN001
    """Re-estimate every BatchNorm's running statistics on ``x`` (cumulative averages over batches, the
    rest of the model in eval mode); returns how many BatchNorms there are.

    Random-weight torchvision models keep BatchNorm's initial statistics (mean 0, variance 1), so their
    activations shrink block after block: random MobileNetV2/V3 give logits near 1e-10 and EfficientNet-B0
    near 1e-14, where cosine and quantization ranges say little. Statistics of real crops give every
    BatchNorm unit-variance outputs, as in a trained network, without changing a single weight."""
    import torch
    from torch import nn

    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    module.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                module(torch.from_numpy(x[i : i + batch]))
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        module.eval()
    return len(bns)


# --------------------------------------------------------------------------------------------- variants


def _input_name(path: Path) -> str:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].name


def ort_static(fp32: Path, out: Path, cal, reduce_range: bool) -> dict[str, Any]:  # noqa: ANN001
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = _input_name(fp32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: cal[i : i + 8]} for i in range(0, len(cal), 8)])

        def get_next(self):  # noqa: ANN202
            return next(self.items, None)

    pre = out.with_name("ort-static.pre.onnx")
    pre_note = "quant_pre_process"
    try:
        quant_pre_process(str(fp32), str(pre))
    except Exception as exc:  # MobileNetV3: symbolic shape inference fails on HardSwish (field notes)
        pre_note = f"quant_pre_process failed ({type(exc).__name__}: {str(exc)[:160]}); retried with skip_symbolic_shape=True"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        reduce_range=reduce_range,
    )
    pre.unlink(missing_ok=True)
    return {"pre_process": pre_note, "reduce_range": reduce_range,
            "config": "quantize_static(QDQ, per_channel=True, QUInt8 activations, QInt8 weights, MinMax)"}


def nncf_ptq(fp32: Path, out: Path, cal) -> dict[str, Any]:  # noqa: ANN001
    import nncf
    import onnx

    name = _input_name(fp32)
    model = onnx.load(str(fp32))
    dataset = nncf.Dataset([{name: cal[i : i + 1]} for i in range(len(cal))])
    quantized = nncf.quantize(model, dataset, subset_size=len(cal))
    onnx.save(quantized, str(out))
    return {"config": f"nncf.quantize(ModelProto, default preset, subset_size={len(cal)}, batch 1 samples)"}


def modelpress_default(graph, data: dict[str, Any], work: Path, threads: int) -> tuple[Path, dict[str, Any]]:  # noqa: ANN001
    """The built-in default recipe as ``modelpress compress MODEL`` runs it (run_recipe), without its
    latency measurement (this benchmark measures); returns the INT8 ONNX file and the pipeline's report."""
    import numpy as np
    import torch

    from modelpress.compress.pipeline import Pipeline
    from modelpress.compress.recipe import load_recipe
    from modelpress.data import DataSplit, TaskData, infer_task
    from modelpress.passes import Context
    from modelpress.targets import get_target

    name = graph.input_spec.names[0]

    def split(x: np.ndarray, labels: np.ndarray | None = None) -> DataSplit:
        batches = [{name: torch.from_numpy(np.ascontiguousarray(x[i : i + 16]))} for i in range(0, len(x), 16)]
        labs = None if labels is None else [torch.from_numpy(labels[i : i + 16]) for i in range(0, len(x), 16)]
        return DataSplit(batches=batches, labels=labs)

    calibration = split(data["calibration"])
    task_data = TaskData(calibration=calibration, evaluation=split(data["fidelity"], data["labels"]),
                         description=data["description"], make_train=lambda: calibration)
    ctx = Context(workdir=work, task=infer_task(graph.input_spec, graph.module), data=task_data,
                  target=get_target("ort-cpu", threads=threads), seed=0)
    result = Pipeline(load_recipe(RECIPE)).run(graph, ctx, measure=False)
    report = result.report
    keep = {k: report.get(k) for k in ("passes", "export", "quality", "warnings")}
    return Path(result.onnx_path), _plain(keep)


def _plain(obj: Any) -> Any:  # noqa: ANN401
    """``obj`` as plain JSON values (the pipeline's report holds dataclasses and arrays)."""
    import dataclasses
    import json

    def default(o: Any) -> Any:  # noqa: ANN401
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        return o.tolist() if hasattr(o, "tolist") else str(o)

    return json.loads(json.dumps(obj, default=default))


# -------------------------------------------------------------------------------------------- measuring


def kernels(path: Path, threads: int) -> dict[str, Any]:
    """Op counts of the graph ONNX Runtime runs after its optimizations."""
    from collections import Counter

    try:
        from modelpress.quantize.qdq import ort_kernels

        counts = ort_kernels(path, workdir=path.parent)
    except ImportError:  # the helper moved: read the optimized graph here
        import onnx

        from modelpress.targets import get_target

        opt = path.with_suffix(".optimized.onnx")
        get_target("ort-cpu", threads=threads).session(path, optimized_path=opt)
        counts = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
        opt.unlink(missing_ok=True)
    return {"counts": {k: int(counts.get(k, 0)) for k in KERNELS}, "all": dict(sorted(counts.items()))}


def logits(path: Path, x, threads: int):  # noqa: ANN001, ANN201
    import numpy as np

    from modelpress.targets import get_target

    sess = get_target("ort-cpu", threads=threads).session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 8]})[0] for i in range(0, len(x), 8)]).astype(np.float64)


def fidelity(out, ref, labels) -> dict[str, Any]:  # noqa: ANN001
    import numpy as np

    norms = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
    cos = (out * ref).sum(1) / np.where(norms > 0, norms, 1.0)  # tiny logits (random weights) still compare
    res = {"cosine_mean": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6),
           "top1_agreement": round(float((out.argmax(1) == ref.argmax(1)).mean()), 4), "samples": len(out)}
    if labels is not None:
        res["accuracy"] = round(float((out.argmax(1) == labels).mean()), 4)
    return res


def _per_round_ratio(report, faster: str, slower: str, batch: int) -> float:  # noqa: ANN001
    """Median over rounds of slower_ms / faster_ms (> 1: ``faster`` is faster), both from the same round."""
    a = report.stats(faster, batch).round_medians_ms
    b = report.stats(slower, batch).round_medians_ms
    return float(statistics.median(y / x for x, y in zip(a, b, strict=True) if x > 0))


def verdict(key: str, variants: dict[str, Any], report, batches: list[int]) -> dict[str, Any]:  # noqa: ANN001
    """modelpress >= ort-static in speed (per batch) and fidelity, and never slower than fp32."""
    ours, peer = variants.get(OURS, {}), variants.get("ort-static", {})
    if report is None:
        return {"passed": None, "reason": "not timed (--skip-latency)"}
    if OURS not in report.variants:
        return {"passed": None, "reason": "modelpress variant missing"}
    out: dict[str, Any] = {"batches": {}}
    for b in batches:
        vs_fp32 = report.stats(OURS, b).speedup
        row = {"modelpress_speedup_vs_fp32": vs_fp32, "not_slower_than_fp32": vs_fp32 >= 1.0 - NOISE_TOLERANCE,
               "not_slower_than_fp32_strict": vs_fp32 >= 1.0}
        if "ort-static" in report.variants:
            ratio = _per_round_ratio(report, OURS, "ort-static", b)
            row.update(modelpress_vs_ort_static=round(ratio, 4), as_fast_as_ort_static=ratio >= 1.0 - NOISE_TOLERANCE,
                       as_fast_as_ort_static_strict=ratio >= 1.0)
        out["batches"][f"batch{b}"] = row
    metric = "accuracy" if key == DIGITS else "cosine_mean"
    if peer.get("fidelity") and ours.get("fidelity"):
        out["fidelity_metric"] = metric
        out["modelpress_fidelity"], out["ort_static_fidelity"] = ours["fidelity"][metric], peer["fidelity"][metric]
        out["as_faithful_as_ort_static"] = ours["fidelity"][metric] >= peer["fidelity"][metric]
    rows = out["batches"].values()
    checks = [r.get("as_fast_as_ort_static") for r in rows] + [r["not_slower_than_fp32"] for r in rows]
    checks.append(out.get("as_faithful_as_ort_static"))
    out["passed"] = None if any(c is None for c in checks) else all(checks)
    out["passed_strict"] = None if out["passed"] is None else all(
        [r.get("as_fast_as_ort_static_strict") for r in rows] + [r["not_slower_than_fp32_strict"] for r in rows]
        + [out.get("as_faithful_as_ort_static")])
    return out


def time_variants(paths: dict[str, Path], spec, info: dict[str, dict[str, Any]], args: argparse.Namespace,  # noqa: ANN001
                  reporter, key: str):  # noqa: ANN001, ANN201 - BenchReport
    """Time one model's variants interleaved; each variant's latency goes into ``info``."""
    from modelpress.bench import get_target, measure

    with reporter.step(f"{key}: latency, {len(paths)} variants interleaved"), quiet():
        report = measure(paths, spec, get_target("ort-cpu", threads=args.threads), rounds=args.rounds,
                         runs=args.runs, min_time_s=args.min_time, max_time_s=args.max_time, baseline=BASELINE,
                         batch_sizes=args.batches, memory=False)
    for name in paths:
        lat = info[name].setdefault("latency", {})
        for b in args.batches:
            s = report.stats(name, b)
            lat[f"batch{b}"] = {"median_ms": round(s.median_ms, 3),
                                "speedup_vs_fp32": None if s.speedup is None else round(s.speedup, 4),
                                "round_medians_ms": [round(x, 3) for x in s.round_medians_ms],
                                "cv": round(s.cv, 4), "runs": s.runs}
    return report


# ------------------------------------------------------------------------------------------------ model


def run_model(key: str, args: argparse.Namespace, tmp: Path, reporter) -> dict[str, Any]:  # noqa: ANN001
    import modelpress
    from modelpress.export import export_onnx
    from modelpress.export.files import onnx_file_size
    from modelpress.system import system_info

    started = time.perf_counter()
    work = tmp / key
    work.mkdir(parents=True, exist_ok=True)
    spec = MODELS[key]
    with reporter.step(f"{key}: loading {spec} (seed 0)"), quiet():
        graph = modelpress.load(spec, seed=0)
    data = model_data(key, graph, args)
    bn_note = "trained model: statistics kept"
    if key != DIGITS and args.bn_stats > 0:
        shape = tuple(int(v) for v in graph.input_spec.shape)
        cfg = getattr(graph.module, "pretrained_cfg", None) or {}
        crops = photo_crops(args.bn_stats, shape[1:], tuple(cfg.get("mean", IMAGENET[0])),
                            tuple(cfg.get("std", IMAGENET[1])), seed=3)  # a third draw: neither set above
        with reporter.step(f"{key}: BatchNorm statistics from {args.bn_stats} crops"), quiet():
            n_bn = recalibrate_batchnorm(graph.module, crops)
        bn_note = f"{n_bn} BatchNorms re-estimated on {args.bn_stats} crops (seed 3), weights untouched"
    elif key != DIGITS:
        bn_note = "random initial statistics (--bn-stats 0)"
    reduce_range = not system_info()["vnni"]
    info: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}

    with reporter.step(f"{key}: FP32 export"), quiet():
        t0 = time.perf_counter()
        exported = export_onnx(graph.module, graph.input_spec, work / "fp32.onnx", optimize="none", opset=17)
    paths[BASELINE] = Path(exported.path)
    v = exported.verification
    info[BASELINE] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 2),
                      "config": "export_onnx(optimize='none', opset=17)",
                      "onnx_vs_torch": None if v is None else {"max_abs_err": v.max_abs_err, "cosine": v.cosine}}

    builders = {
        "ort-static": lambda out: ort_static(paths[BASELINE], out, data["calibration"], reduce_range),
        "nncf": lambda out: nncf_ptq(paths[BASELINE], out, data["calibration"]),
    }
    for name in ("ort-static", "nncf", OURS):
        if name == "nncf" and args.no_nncf:
            info[name] = {"status": "skipped", "reason": "--no-nncf"}
            continue
        try:
            with reporter.step(f"{key}: {name}"), quiet():
                t0 = time.perf_counter()
                if name == OURS:
                    path, extra = modelpress_default(graph, data, work / "modelpress", args.threads)
                    extra = {"recipe": RECIPE, "data": MODELPRESS_DATA, "pipeline": extra}
                else:
                    path = work / f"{name}.onnx"
                    extra = builders[name](path)
                seconds = time.perf_counter() - t0
        except Exception as exc:  # record why, measure the rest
            info[name] = failure(exc)
            reporter.log(f"[yellow]{key}: {name} failed:[/yellow] {str(exc)[:300]}")
            continue
        paths[name] = path
        info[name] = {"status": "ok", "seconds": round(seconds, 2), **extra}

    with reporter.step(f"{key}: fidelity and kernels"), quiet():
        ref = logits(paths[BASELINE], data["fidelity"], args.threads)
        for name, path in list(paths.items()):
            try:
                info[name]["file_size_mb"] = round(onnx_file_size(path) / 1e6, 3)
                info[name]["kernels"] = kernels(path, args.threads)
                info[name]["fidelity"] = fidelity(logits(path, data["fidelity"], args.threads), ref, data["labels"])
            except Exception as exc:
                if name == BASELINE:
                    raise
                info[name] = {**info[name], **failure(exc)}
                paths.pop(name)
                reporter.log(f"[yellow]{key}: {name} does not run:[/yellow] {str(exc)[:300]}")
    build_seconds = time.perf_counter() - started

    report = None if args.skip_latency else time_variants(paths, graph.input_spec, info, args, reporter, key)
    return {
        "spec": spec,
        "parameters": sum(p.numel() for p in graph.module.parameters()),
        "input_shape": list(graph.input_spec.shape),
        "data": data["description"],
        "batchnorm_statistics": bn_note,
        # how telling top-1 agreement is: random-weight models may put most crops in a few classes
        "fp32_distinct_top1_classes": int(len(set(ref.argmax(1).tolist()))),
        "variants": info,
        "verdict": verdict(key, info, report, args.batches),
        "build_seconds": round(build_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


# ------------------------------------------------------------------------------------------------ output


def _kernel_cell(e: dict[str, Any]) -> str:
    c = (e.get("kernels") or {}).get("counts")
    if not c:
        return "-"
    return f"{c['QLinearConv']}/{c['QLinearAdd']}/{c['Conv']}/{c['DequantizeLinear']}/{c['BatchNormalization']}"


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    batches = result["args"]["batches"]
    for key, m in result["models"].items():
        if "variants" not in m:
            out.append([key, "-", *["-"] * len(batches), "-", m.get("status", "failed"), "-", "-"])
            continue
        for name, e in m["variants"].items():
            if e.get("status") != "ok":
                out.append([key, name, *["-"] * len(batches), "-", e.get("status", "-"), "-", "-"])
                continue
            cells = []
            for b in batches:
                s = (e.get("latency") or {}).get(f"batch{b}", {})
                cells.append(f"{fmt(s.get('median_ms'), '.2f')} ({fmt(s.get('speedup_vs_fp32'), '.2f', 'x')})")
            f = e.get("fidelity") or {}
            quality = f"acc {f['accuracy']:.4f}" if "accuracy" in f else f"{fmt(f.get('top1_agreement'), '.3f')}"
            out.append([key, name, *cells, fmt(e.get("file_size_mb"), ".2f"),
                        f"{fmt(f.get('cosine_mean'), '.4f')} ({fmt(f.get('cosine_min'), '.4f')})", quality,
                        _kernel_cell(e)])
    return out


def headers(result: dict[str, Any]) -> list[str]:
    return ["model", "variant", *[f"b{b} ms (speedup)" for b in result["args"]["batches"]], "MB",
            "cosine mean (min)", "top-1 agree / acc", "QLinearConv/QLinearAdd/Conv/DQ/BN"]


def markdown(result: dict[str, Any]) -> str:
    sysinfo = result["system"]
    lines = [
        f"INT8 on CNNs, ONNX Runtime CPU, {result['args']['threads']} threads ({sysinfo.get('cpu_model')}, "
        f"VNNI: {sysinfo.get('vnni')}; {result['args']['rounds']} interleaved rounds"
        f"{', QUICK smoke numbers' if result['quick'] else ''}). Random weights (seed 0) except the digits CNN; "
        "fidelity is the cosine of logits to the FP32 ONNX model's on held-out photo crops; kernels are counted "
        "in ONNX Runtime's optimized graph.",
        "",
        "| " + " | ".join(headers(result)) + " |",
        "|" + "---|" * len(headers(result)),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows(result)]
    lines.append("")
    for key, m in result["models"].items():
        v = m.get("verdict") or {}
        if v.get("passed") is not None:
            lines.append(f"- {key}: modelpress >= ort-static (speed, fidelity) and >= fp32: "
                         f"{'yes' if v['passed'] else 'no'}")
    return "\n".join(lines) + "\n"


def print_table(con, result: dict[str, Any]) -> None:  # noqa: ANN001
    from rich.table import Table

    table = Table(title="INT8 on CNNs (speedup vs fp32 in brackets)")
    for h in headers(result):
        table.add_column(h, justify="left" if h in ("model", "variant") else "right")
    for r in rows(result):
        table.add_row(*r)
    con.print(table)
    for key, m in result["models"].items():
        v = m.get("verdict") or {}
        con.print(f"  {key}: verdict passed={v.get('passed')} (strict {v.get('passed_strict')}) "
                  + " ".join(f"{b}: vs ort-static {r.get('modelpress_vs_ort_static', '-')}, vs fp32 "
                             f"{fmt(r.get('modelpress_speedup_vs_fp32'), '.3f')}" for b, r in (v.get("batches") or {}).items()))


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help=f"comma-separated, from: {','.join(MODELS)} (default: all)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per variant, batch and round")
    parser.add_argument("--min-time", type=float, default=0.5, help="minimum seconds per variant, batch, round")
    parser.add_argument("--max-time", type=float, default=10.0, help="maximum seconds per variant, batch, round")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    parser.add_argument("--calibration", type=int, default=64, help="calibration crops (default 64)")
    parser.add_argument("--fidelity", type=int, default=64, help="fidelity crops (default 64)")
    parser.add_argument("--bn-stats", type=int, default=64,
                        help="crops to re-estimate BatchNorm statistics of random-weight models on (0: keep the "
                        "initial statistics, whose activations vanish in MobileNets/EfficientNet)")
    parser.add_argument("--no-nncf", action="store_true", help="skip NNCF")
    parser.add_argument("--skip-latency", action="store_true",
                        help="build and score every variant, time nothing (which models quantize with which peer)")
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet18 + digits CNN, 1 round, 3 runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "cnn.json")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",") if b.strip()]
    if args.quick:
        args.rounds, args.runs, args.min_time = 1, 3, 0.0
    keys = [k.strip() for k in args.models.split(",")] if args.models else list(QUICK_MODELS if args.quick else MODELS)
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")

    import torch

    from modelpress.bench import system_info, write_json_atomic
    from modelpress.progress import Reporter
    from modelpress.system import load_average

    torch.set_num_threads(args.threads)
    con = console()
    reporter = Reporter()
    started = time.perf_counter()
    system = system_info(args.threads)
    result: dict[str, Any] = {
        "benchmark": "cnn",
        "quick": args.quick,
        "command": "python benchmarks/cnn.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "system": system,
        "cpu_flags": system["cpu_flags"],
        "versions": {**system.get("versions", {}),
                     **{d: dist_version(d) for d in ("modelpress", "torch", "torchvision", "timm", "onnx",
                                                      "onnxruntime", "nncf", "scikit-learn")}},
        "load_average": {"before": load_average()},
        "protocol": (
            "per model: every variant built first; fidelity on the held-out crops vs the FP32 ONNX logits; "
            f"latency: ort-cpu at {args.threads} threads, batches {args.batches}, the model's variants "
            f"interleaved round-robin with fresh sessions every round, {args.rounds} rounds, warm-up, >= "
            f"{args.runs} runs and >= {args.min_time}s (<= {args.max_time}s) per variant, batch and round; "
            "medians of per-round medians; speedups are medians of per-round ratios against fp32"),
        "modelpress_data": MODELPRESS_DATA,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="modelpress-cnn-") as tmp:
        for key in keys:
            if MODELS[key].startswith("timm:") and dist_version("timm") is None:
                result["models"][key] = {"status": "skipped", "reason": "timm is not installed"}
                continue
            try:
                result["models"][key] = run_model(key, args, Path(tmp), reporter)
            except Exception as exc:  # a model that does not load or export: recorded, the rest go on
                result["models"][key] = failure(exc)
                reporter.log(f"[red]{key} failed:[/red] {exc}")
            result["load_average"]["after"] = load_average()
            result["seconds"] = round(time.perf_counter() - started, 1)
            write_json_atomic(args.out, result)  # each model kept as soon as it is done
    out = write_json_atomic(args.out, result)
    md = Path(args.out).with_suffix(".md")
    md.write_text(markdown(result))
    con.print(f"CPU: {system['cpu_model']} | VNNI: {system.get('vnni')} | flags: {' '.join(system['cpu_flags'])}")
    print_table(con, result)
    con.print(f"wrote {out} and {md} ({result['seconds']:.0f} s{', QUICK: smoke numbers' if args.quick else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
