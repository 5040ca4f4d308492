"""Quantization passes for recipes: ``quantize.repq`` (graph stage, fake-quant torch model, exported as QDQ)
and the ONNX-stage baselines ``quantize.nncf`` and ``quantize.ort-static`` (``quantize.ort-dynamic`` lives
in ort_dynamic.py).

Graph interface used (duck-typed): ``graph.copy()``, ``graph.module``, optional ``graph.norm_consumers()``
-> [(norm, [consumer Linear names], other_readers)], optional ``graph.blocks`` -> objects with ``.path``.
Context: ``ctx.calibration.batches`` (list of dicts of tensors), ``ctx.reporter``, ``ctx.workdir``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.passes import GraphPass, OnnxPass, PassConfig, PassResult, register
from modelpress.quantize.lowering import export_quantized

Observer = Literal["minmax", "percentile", "mse"]


def calibration_batches(ctx: Any, samples: int) -> list[Any]:
    """The first ``samples`` calibration samples as batches (the last batch cut to fit)."""
    split = getattr(ctx, "calibration", None)
    if split is None or not getattr(split, "batches", None):
        raise ModelpressError(
            "quantization needs calibration data",
            "give the task's data (a calibration split of 32 to 128 samples)",
        )
    out, n = [], 0
    for b in split.batches:
        size = int(next(iter(b.values())).shape[0]) if isinstance(b, dict) else int(b.shape[0])
        take = min(size, samples - n)
        if take <= 0:
            break
        out.append({k: v[:take] for k, v in b.items()} if isinstance(b, dict) else b[:take])
        n += take
    return out


def _numpy_feeds(ctx: Any, samples: int, onnx_path: Path) -> list[dict[str, Any]]:
    import onnx

    names = {i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input}
    feeds = []
    for b in calibration_batches(ctx, samples):
        items = b.items() if isinstance(b, dict) else [(next(iter(names)), b)]
        feeds.append({k: v.detach().cpu().numpy() for k, v in items if k in names})
    return feeds


def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX) that ONNX
    Runtime's U8S8 kernels use without int16 saturation. Unknown CPUs count as without."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))



def _block_paths(graph: Any, *, required: bool) -> list[str] | None:
    """The graph's block paths in execution order; None where it has none, or where finding them fails and
    they only stage statistics (layer granularity: one stage of every layer then, the same result)."""
    if not hasattr(graph, "blocks"):
        return None
    try:
        return [b.path for b in (graph.blocks() if callable(graph.blocks) else graph.blocks)]
    except Exception:
        if required:
            raise
        return None

class RepQPassConfig(PassConfig):
    default: str | int = "w8a8"
    policy: dict[str, Any] = Field(default_factory=dict)
    samples: int = Field(128, ge=1, le=4096)
    act_observer: Observer = "mse"
    norm_observer: Observer = "minmax"
    weight_observer: Literal["auto", "minmax", "percentile", "mse"] = "auto"
    attention: bool = False
    probs: Literal["uniform", "log2", "logsqrt2"] = "logsqrt2"
    reparam: bool = True
    reparam_mode: Literal["auto", "fold", "affine"] = "auto"
    # a norm whose consumers the policy splits (float and INT8, or different bits): an error, or "skip" its
    # reparameterization (those consumers keep per-tensor input scales; the search's per-Linear genes)
    mixed_norm_readers: Literal["error", "skip"] = "error"
    dual_clipping: bool = False
    clipping_steps: int = Field(200, ge=1)
    reconstruction: Literal["none", "gptq", "adaround"] = "gptq"
    # block: GPTQ's sequential order (each block's statistics on the inputs the already-quantized blocks before
    # it produce), no quantized weights held aside until the end (layer: 81 MiB on BERT-base, 1 GiB on a 1B
    # model). Measured against layer (mean / min fidelity): MiniLM int8 0.99853/0.99694 vs 0.99855/0.99593,
    # w4a8 0.95085/0.88935 vs 0.95119/0.89232; digits ViT and CNN at w8a8 and w4a8: the same accuracy
    granularity: Literal["layer", "block"] = "block"
    log2_inference: bool = True
    weight_reduce_range: bool | Literal["auto"] = "auto"
    # zero points 0, as TensorRT's explicit quantization needs; auto: on when the run targets TensorRT
    symmetric_activations: bool | Literal["auto"] = "auto"
    auto_float: int = Field(0, ge=0)
    auto_float_target: float | None = None
    channel_sites: list[str] = Field(default_factory=list)
    auto_channel: int = Field(0, ge=0)
    channel_floor: float = Field(0.25, ge=0.0, le=1.0)
    channel_min_gain: float = Field(0.1, ge=0.0, le=1.0)
    norm_floor: float | Literal["auto"] = "auto"  # see repq.AUTO_NORM_FLOOR
    # fold each BatchNorm into the Conv/Linear before it (exact; logged as an edit) before calibrating
    fold_norms: bool = True
    # where the QDQ pairs go in the export: see lowering.export_quantized
    placement: Literal["auto", "conv", "linear"] = "auto"
    # measure INT8 against float on the run's target; keep float the blocks where INT8 loses, or the model
    keep_faster: bool = True


@register
class RepQPass(GraphPass):
    """RepQ-ViT / RepQuant post-training quantization of the torch model (fake-quant with explicit scales;
    export lowers it to ONNX QDQ). Defaults: W8A8, per-channel calibration of post-norm activations
    reparameterized to per-tensor, MSE-searched clipping elsewhere, GPTQ weight reconstruction on
    min-max weight scales, 128 calibration samples (fewer if the split has fewer), 7-bit weights when
    the CPU running the pass has no VNNI (``weight_reduce_range: auto``)."""

    name = "quantize.repq"
    Config = RepQPassConfig

    def apply(self, graph: Any, ctx: Any) -> PassResult:
        from modelpress.quantize.repq import RepQConfig, quantize_model

        cfg = self.config
        batches = calibration_batches(ctx, cfg.samples)
        if hasattr(graph, "own_weights"):
            # the copy's tensors cloned one at a time, each of the original's mapped ones dropped once cloned (the
            # original is read again only by the auto-float scan at the end): never the file and the copy resident
            out = graph.copy(share_weights=True)
            out.own_weights(graph)
            graph.drop_mapped_weights()
        else:
            out = graph.copy()
        folded = out.fold_norms() if cfg.fold_norms and hasattr(out, "fold_norms") else []
        pairs = out.norm_consumers() if hasattr(out, "norm_consumers") else []
        # the blocks stage reconstruction's statistics at either granularity (one block's Hessians held at a time)
        blocks = _block_paths(out, required="granularity" in cfg.model_fields_set and cfg.granularity == "block")
        values = {k: v for k, v in cfg.model_dump().items() if k not in ("samples", "fold_norms", "placement", "keep_faster")}
        convolutional = cfg.placement != "linear" and sum(isinstance(m, nn.Conv2d) for m in out.module.modules()) >= 2
        if convolutional:
            # ONNX Runtime's conv placement quantizes every tensor per tensor: per-channel reparameterized
            # Linear inputs (a transformer's fix for outlier channels) have no form there
            values["auto_channel"], values["channel_sites"] = 0, []
        if values["weight_reduce_range"] == "auto":
            # U8S8 integer kernels saturate on CPUs without VNNI unless weights use 7 bits
            values["weight_reduce_range"] = not cpu_has_vnni()
        if values["symmetric_activations"] == "auto":
            values["symmetric_activations"] = getattr(getattr(ctx, "target", None), "name", None) == "tensorrt"
        rq = RepQConfig(**values)
        reporter = getattr(ctx, "reporter", None)
        result = quantize_model(
            out.module, batches, pairs, rq, blocks=blocks, reporter=reporter, float_model=graph.module
        )
        if hasattr(out, "invalidate"):
            out.invalidate()
        metrics = {k: v for k, v in result.metrics.items() if k not in ("config",)}
        metrics["calibration_samples"] = sum(
            int(next(iter(b.values())).shape[0]) if isinstance(b, dict) else int(b.shape[0]) for b in batches
        )
        metrics["folded_norms"] = len(folded)
        exporter = partial(export_quantized, placement=cfg.placement, calibration_samples=cfg.samples,
                           keep_faster=cfg.keep_faster)
        return PassResult(graph=out, metrics=metrics, exporter=exporter)


class NNCFConfig(PassConfig):
    samples: int = Field(64, ge=1, le=4096)
    preset: Literal["performance", "mixed"] = "mixed"
    model_type: Literal["transformer", "none"] = "transformer"
    fast_bias_correction: bool = True


@register
class NNCFQuantize(OnnxPass):
    """NNCF post-training quantization on the exported ONNX model (nncf.quantize, transformer model type)."""

    name = "quantize.nncf"
    Config = NNCFConfig

    def apply(self, target: Path, ctx: Any) -> PassResult:
        try:
            import nncf
        except ImportError as e:  # pragma: no cover - optional extra
            raise ModelpressError(
                "quantize.nncf needs the nncf package", "pip install 'modelpress[nncf]'"
            ) from e
        import onnx

        cfg = self.config
        target = Path(target)
        feeds = _numpy_feeds(ctx, cfg.samples, target)
        model = onnx.load(str(target))
        kwargs: dict[str, Any] = {
            "subset_size": sum(next(iter(f.values())).shape[0] for f in feeds),
            "preset": nncf.QuantizationPreset.MIXED
            if cfg.preset == "mixed"
            else nncf.QuantizationPreset.PERFORMANCE,
            "fast_bias_correction": cfg.fast_bias_correction,
        }
        if cfg.model_type == "transformer":
            kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        step = getattr(ctx, "reporter", None)
        with step.step("NNCF post-training quantization") if step is not None else _null():
            quantized = nncf.quantize(model, nncf.Dataset(_per_sample(feeds)), **kwargs)
        out = Path(ctx.workdir) / f"{target.stem}.int8-nncf.onnx"
        onnx.save(quantized, str(out))
        return PassResult(onnx_path=out, metrics={"samples": kwargs["subset_size"], "preset": cfg.preset})


def _per_sample(feeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """NNCF counts subset_size in dataset items: give it one sample per item."""
    out = []
    for f in feeds:
        n = next(iter(f.values())).shape[0]
        out += [{k: v[i : i + 1] for k, v in f.items()} for i in range(n)]
    return out


class _null:  # noqa: N801
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class OrtStaticConfig(PassConfig):
    samples: int = Field(64, ge=1, le=4096)
    per_channel: bool = True
    op_types: list[str] = Field(default_factory=lambda: ["MatMul"])
    reduce_range: bool = False
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    activation_type: Literal["quint8", "qint8"] = "quint8"
    weight_type: Literal["qint8", "quint8"] = "qint8"


@register
class OrtStaticInt8(OnnxPass):
    """onnxruntime.quantization.quantize_static in QDQ format (the ONNX Runtime static baseline)."""

    name = "quantize.ort-static"
    Config = OrtStaticConfig

    def apply(self, target: Path, ctx: Any) -> PassResult:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        cfg = self.config
        target = Path(target)
        feeds = _numpy_feeds(ctx, cfg.samples, target)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = iter(feeds)

            def get_next(self) -> dict | None:
                return next(self._it, None)

        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[cfg.calibrate_method]
        qt = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}
        out = Path(ctx.workdir) / f"{target.stem}.int8-static.onnx"
        step = getattr(ctx, "reporter", None)
        with step.step("ONNX Runtime static INT8 quantization") if step is not None else _null():
            quantize_static(
                str(target),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(cfg.op_types),
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                activation_type=qt[cfg.activation_type],
                weight_type=qt[cfg.weight_type],
                calibrate_method=method,
            )
        return PassResult(
            onnx_path=out,
            metrics={
                "quantized_ops": list(cfg.op_types),
                "per_channel": cfg.per_channel,
                "method": cfg.calibrate_method,
            },
        )
