"""Lower a fake-quant torch model to ONNX QuantizeLinear/DequantizeLinear (QDQ) for integer kernels.

The fake-quant modules trace to QDQ directly (``modelpress.quantize.quantizers.export_mode``):

* weights: int8 codes stored as initializers, transposed to [in, out], with a per-output-channel
  ``DequantizeLinear(axis=1)`` feeding the MatMul directly (no Transpose between them);
* activations: ``QuantizeLinear -> DequantizeLinear`` (per tensor, uint8 or int8) on each MatMul input,
  with the calibrated scale and zero point;
* the consumer-side reparameterization transform, where present, is a Mul and Add before the Q.

After export the graph is cleaned: Constant nodes become initializers, identical small initializers and
identical nodes (q, k and v each quantize the same tensor with the same parameters) are merged, unused
initializers are dropped. ONNX Runtime fuses ``DQ -> MatMul`` into MatMulIntegerToFloat (or
``DQ -> MatMul -> Q`` into QLinearMatMul) but leaves the bias Add outside; ``ort_fusion`` (default) writes
the MatMulIntegerToFloat with its bias directly (measured 1.13-1.16x faster than ORT dynamic INT8 on
MiniLM, against 0.91x without it). ``ort_kernels`` reads the kernels ONNX Runtime actually chose from its
saved optimized model.

CPUs without VNNI: ONNX Runtime's U8S8 kernels on AVX2 add pairs of u8*s8 products in int16 with
saturation, which loses accuracy when weights use the full int8 range. Quantize weights with
``weight_reduce_range=True`` (7-bit codes: 2 * 255 * 64 < 32767, no saturation) for such targets; the
``quantize.repq`` pass does so by default when the CPU it runs on has no VNNI. S8S8 (int8 activations)
exports and verifies too, but ONNX Runtime 1.32 ran it 9x slower than U8S8 on an AVX512-VNNI x86 CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from modelpress.export.files import move_onnx
from modelpress.export.streamed import STREAM_MIN_BYTES, export_streamed, weight_bytes
from modelpress.export.verify import compare_onnx
from modelpress.graph.mapped import dropped_after_use
from modelpress.graph.run import PrimaryOutput, eval_mode, run_primary


def _switch_attention(model: nn.Module) -> list[tuple[Any, str]]:
    """HF attention that is not our quantized function exports as eager (restored after)."""
    from modelpress.quantize import hf_attention

    changed = []
    for cfg in hf_attention._configs(model):
        impl = cfg._attn_implementation
        if impl not in (hf_attention.IMPL, "eager"):
            changed.append((cfg, impl))
            cfg._attn_implementation = "eager"
    return changed


def export_qdq(
    model: nn.Module,
    example: dict[str, torch.Tensor] | torch.Tensor,
    path: Path | str,
    input_names: Sequence[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = 17,
    activation_dtype: str = "uint8",
    channel_quantize: bool = False,
    ort_fusion: bool = True,
    log_form: str = "uniform",
    custom_opsets: dict[str, int] | None = None,
    stream: bool | None = None,
) -> Path:
    """Export the fake-quant ``model`` to a QDQ ONNX file at ``path`` (one output: the primary output).

    ``example``: a dict of input tensors (text models; names in order) or one tensor (image/tensor
    models). ``activation_dtype``: "uint8" (U8S8 kernels) or "int8" (S8S8). ``channel_quantize``: see
    ``export_mode`` (per-channel Q instead of Mul/Add for consumer-side reparameterization).
    ``ort_fusion``: write ONNX Runtime's MatMulIntegerToFloat with the bias inside (``fuse_for_ort``);
    False keeps a plain standard QDQ graph (for other runtimes, e.g. TensorRT). ``log_form``: how log2 /
    log-sqrt2 attention-probability quantizers export, which ONNX cannot express as QDQ ("uniform": 8-bit
    QDQ, integer kernels; "simulate": exact levels in float ops; see ``quantizers.LOG_FORMS``).
    ``custom_opsets``: contrib domains the traced graph uses (``{"com.microsoft": 1}`` for MatMulNBits).
    ``stream``: trace without the parameters and write the float tensors the graph reads from the live model
    (``export.streamed``; the quantized weights are the graph's int8 constants either way), instead of torch's
    exporter holding its copies of every float weight, quantized or not (None: for models of at least
    ``STREAM_MIN_BYTES``).
    """
    from modelpress.quantize.quantizers import export_mode

    path = Path(path)
    if isinstance(example, dict):
        names = list(input_names or example.keys())
        args = tuple(example[n] for n in names)
    else:
        names = list(input_names or ["input"])
        args = (example,)
    wrapped = PrimaryOutput(model, names)
    if dynamic_axes is None:
        dynamic_axes = {
            n: ({0: "batch", 1: "sequence"} if isinstance(example, dict) else {0: "batch"}) for n in names
        }
    changed = _switch_attention(model)
    raw = path.with_suffix(".raw.onnx")
    try:
        with (
            eval_mode(model),
            torch.no_grad(),  # else every fake-quantized weight the trace computes is kept for a backward
            export_mode(activation_dtype, channel_quantize, log_form),
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            kwargs = {"output_names": ["output"], "dynamic_axes": {**dynamic_axes, "output": {0: "batch"}},
                      "opset_version": opset, "dynamo": False, "custom_opsets": custom_opsets}
            streamed = stream if stream is not None else weight_bytes(model) >= STREAM_MIN_BYTES
            if streamed:
                export_streamed(wrapped, args, raw, input_names=names, constants_min_elems=SMALL_ELEMS + 1,
                                graph_shape_inference=False, **kwargs)
            else:
                torch.onnx.export(wrapped, args, str(raw), input_names=names, do_constant_folding=True, **kwargs)
    finally:
        for cfg, impl in changed:
            cfg._attn_implementation = impl
    if streamed:  # the graph and its small tensors only: the weights stay in their data file, moved with it
        m = onnx.load(str(raw), load_external_data=False)
        _load_small_tensors(m, raw.parent)
    else:
        m = onnx.load(str(raw))
    cleanup(m)
    if ort_fusion:
        fuse_for_ort(m)
    if streamed:
        onnx.save(m, str(raw))
        move_onnx(raw, path)  # with its data file where tensors stayed there
        raw.with_name(raw.name + ".data").unlink(missing_ok=True)
    else:
        raw.unlink(missing_ok=True)
        onnx.save(m, str(path))
    del m  # the checker parses the file on its own: the model is not held twice (BERT-base: -0.4 GiB at the peak)
    onnx.checker.check_model(str(path))
    return path


def _load_small_tensors(m: onnx.ModelProto, base: Path) -> None:
    """Read into the graph the external initializers of at most ``SMALL_ELEMS`` elements (scales, zero points,
    biases, norms): what ``cleanup`` and ``fuse_for_ort`` look at; the large ones stay in the data file."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for t in m.graph.initializer:
        if uses_external_data(t) and math.prod(t.dims) <= SMALL_ELEMS:
            load_external_data_for_tensor(t, str(base))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


# ------------------------------------------------------------------------------------------ graph cleanup
SMALL_ELEMS = 1 << 16  # initializers up to this size are merged when identical (and read into a streamed graph)


def _constants_to_initializers(g: onnx.GraphProto) -> None:
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)


def _dedupe_initializers(g: onnx.GraphProto, max_elems: int | None = None) -> None:
    canon: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for t in g.initializer:
        if math.prod(t.dims) > (SMALL_ELEMS if max_elems is None else max_elems) or t.data_location == t.EXTERNAL:
            keep.append(t)
            continue
        arr = numpy_helper.to_array(t)
        key = (t.data_type, tuple(arr.shape), hashlib.sha1(arr.tobytes()).hexdigest())
        if key in canon:
            rename[t.name] = canon[key]
        else:
            canon[key] = t.name
            keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]


def _cse(g: onnx.GraphProto) -> int:
    """Merge nodes with the same op, inputs and attributes (in topological order)."""
    seen: dict[tuple, list[str]] = {}
    rename: dict[str, str] = {}
    keep, merged = [], 0
    graph_outputs = {o.name for o in g.output}
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
        key = (n.op_type, n.domain, tuple(n.input), tuple(a.SerializeToString() for a in n.attribute))
        if (
            n.op_type in ("QuantizeLinear", "DequantizeLinear", "Mul", "Add", "Transpose", "Cast")
            and key in seen
        ):
            if any(o in graph_outputs for o in n.output):
                keep.append(n)
                continue
            for old, new in zip(n.output, seen[key], strict=True):
                rename[old] = new
            merged += 1
            continue
        seen.setdefault(key, list(n.output))
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return merged


def _drop_unused(g: onnx.GraphProto) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def cleanup(m: onnx.ModelProto) -> onnx.ModelProto:
    g = m.graph
    _constants_to_initializers(g)
    _dedupe_initializers(g)
    while _cse(g):
        pass
    _drop_unused(g)
    return m


# --------------------------------------------------------------------------- ONNX Runtime integer kernels
def fuse_for_ort(m: onnx.ModelProto) -> int:
    """Rewrite ``Q(x) -> DQ -> MatMul(., DQ(W int8)) -> Add(bias)`` into ONNX Runtime's
    ``com.microsoft.MatMulIntegerToFloat(x_q, W, a_scale, b_scale, a_zero, b_zero, bias)``.

    ONNX Runtime's own QDQ fusion turns ``DQ -> MatMul`` into MatMulIntegerToFloat but leaves the bias Add
    outside; with the bias inside, the graph gets the same integer kernels as ONNX Runtime's dynamic
    quantization, with the activation quantization precomputed. Returns the number of MatMuls rewritten.
    Only for ONNX Runtime (the contrib op is not standard ONNX).

    The residual Add + LayerNormalization stay unfused on purpose: ONNX Runtime 1.32's CPU
    SkipLayerNormalization ran 7x slower than Add + LayerNormalization at [1..8, 128, 384] (1 or 2
    threads), and writing it for MiniLM's 12 residuals made the model 0.75x as fast. (ORT's dynamic INT8
    graph fuses 6 of them, the feed-forward ones, whose Add inputs have known shapes.) The bias is inside
    MatMulIntegerToFloat, so there is no bias Add for BiasGelu either, as in the dynamic INT8 graph.
    """
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    remove: set[int] = set()
    new_nodes: dict[int, onnx.NodeProto] = {}
    count = 0
    for n in g.node:
        if n.op_type != "MatMul" or len(n.input) != 2:
            continue
        a_dq, b_dq = producer.get(n.input[0]), producer.get(n.input[1])
        if (
            a_dq is None
            or b_dq is None
            or a_dq.op_type != "DequantizeLinear"
            or b_dq.op_type != "DequantizeLinear"
        ):
            continue
        if b_dq.input[0] not in inits or inits[b_dq.input[0]].data_type != onnx.TensorProto.INT8:
            continue
        if any(a.name == "axis" for a in a_dq.attribute) or len(a_dq.input) < 3:
            continue  # the activation must be per tensor
        b_axis = next((a.i for a in b_dq.attribute if a.name == "axis"), 1)
        b_scale = inits.get(b_dq.input[1])
        if b_scale is None or (len(b_scale.dims) == 1 and b_axis not in (1, -1)):
            continue
        outs = consumers.get(n.output[0], [])
        bias_name, tail = "", n
        if len(outs) == 1 and outs[0].op_type == "Add" and n.output[0] not in graph_outputs:
            add = outs[0]
            other = add.input[1] if add.input[0] == n.output[0] else add.input[0]
            t = inits.get(other)
            if t is not None and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 1:
                bias_name, tail = other, add
        inputs = [a_dq.input[0], b_dq.input[0], a_dq.input[1], b_dq.input[1], a_dq.input[2]]
        inputs += [b_dq.input[2] if len(b_dq.input) > 2 else "", bias_name]
        fused = onnx.helper.make_node(
            "MatMulIntegerToFloat",
            inputs,
            [tail.output[0]],
            name=f"{n.name or 'matmul'}_int8",
            domain="com.microsoft",
        )
        idx = list(g.node).index(n)
        new_nodes[idx] = fused
        remove.add(id(n))
        if tail is not n:
            remove.add(id(tail))
        count += 1
    if not count:
        return 0
    nodes = []
    for i, n in enumerate(g.node):
        if i in new_nodes:
            nodes.append(new_nodes[i])
        elif id(n) not in remove:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    # DequantizeLinear nodes left without readers
    while True:
        used = {i for n in g.node for i in n.input} | graph_outputs
        dead = [n for n in g.node if n.op_type == "DequantizeLinear" and not any(o in used for o in n.output)]
        if not dead:
            break
        keep = [n for n in g.node if all(n is not d for d in dead)]
        del g.node[:]
        g.node.extend(keep)
    _drop_unused(g)
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return count


# ---------------------------------------------------------------------------------------- inspection
def ort_session(path: Path | str, threads: int = 2, optimized_path: Path | str | None = None):  # noqa: ANN201
    """A CPU session at ``threads`` threads (``optimized_path``: save ORT's optimized graph there)."""
    from modelpress.targets import cpu_session

    return cpu_session(path, threads, optimized_path=optimized_path)


INTEGER_KERNELS = (
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QLinearConv",
    "ConvInteger",
    "QAttention",
)


def export_examples(graph: Any) -> tuple[Any, list[Any]]:
    """The example input a quantized export traces with and the two batches it is verified on (text: dicts at
    sequence 16 / 24; one-input models: the bare tensor)."""
    text = graph.input_spec.kind == "text"
    example = graph.example_inputs(2, 16 if text else None)
    batches = [graph.example_inputs(2, 24 if text else None, seed=s) for s in (1, 2)]
    if not text:
        example = example[graph.input_spec.names[0]]
        batches = [b[graph.input_spec.names[0]] for b in batches]
    return example, batches


def log_quantizer_count(model: nn.Module) -> int:
    """Enabled, calibrated log2 / log-sqrt2 quantizers in ``model`` (they have no ONNX QDQ form)."""
    from modelpress.quantize.quantizers import Log2Quantizer, LogSqrt2Quantizer

    return sum(
        isinstance(m, (Log2Quantizer, LogSqrt2Quantizer)) and m.enabled and m.calibrated
        for m in model.modules()
    )


def ort_kernels(path: Path | str, workdir: Path | str | None = None) -> Counter:
    """Op types of the graph ONNX Runtime runs after its optimizations (read from its saved model)."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort_session(path, optimized_path=opt)
        m = onnx.load(str(opt), load_external_data=False)  # the op types only (a large model's weights stay out)
    return Counter(n.op_type for n in m.graph.node)


def integer_kernel_count(kernels: Counter) -> int:
    return sum(v for k, v in kernels.items() if k in INTEGER_KERNELS)


def verify_qdq(
    path: Path | str,
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor] | torch.Tensor],
    *,
    min_cosine: float = 0.999,
    atol: float = float("inf"),
    rtol: float = 0.0,
) -> dict[str, Any]:
    """Compare ONNX Runtime on the QDQ file with the torch fake-quant model (``export.verify``'s comparison).

    Returns max abs error, relative error (``||onnx - torch|| / ||torch||``, largest per batch), min
    per-sample cosine and ``ok``. A QDQ graph rounds where the simulation rounds, so single elements may
    differ by a quantization step: the default thresholds check the cosine only.
    """
    feeds = [
        {k: v.detach().cpu().numpy() for k, v in b.items()} if isinstance(b, dict) else b.detach().cpu().numpy()
        for b in batches
    ]
    with dropped_after_use(model):  # mapped weights off the resident set again under the session
        reference = [
            run_primary(model, b if isinstance(b, dict) else (b,)).float().cpu().numpy() for b in batches
        ]
    v = compare_onnx(path, feeds, reference, atol=atol, min_cosine=min_cosine, rtol=rtol, threads=2)
    return {"max_abs_error": v.max_abs_err, "relative_error": v.relative_error, "min_cosine": v.cosine, "ok": v.ok,
            "reference_max_abs": v.reference_max}
