"""Lowering packed weight-only layers to ONNX Runtime's ``com.microsoft.MatMulNBits``.

``WeightOnlyLinear`` traces (while ``exporting``) through an autograd function whose ONNX symbolic is
MatMulNBits over the layer's own packed buffers (the same bytes the torch model saves); a following bias Add
is moved into MatMulNBits' bias input after export. Embeddings (``WeightOnlyEmbedding``) export as one
``com.microsoft.GatherBlockQuantized`` over the same packed rows (seen through a Reshape), so a tied embedding
and LM head share one initializer in the file.

``accuracy_level`` (MatMulNBits' compute type on CPU: 0/1 float32 activations, 4 int8 activations quantized
per block at run time, which needs an integer dot-product path): ``"auto"`` exports both, checks both against
the torch model, times both on the run's target (interleaved) and keeps the faster one that agrees; without a
target it uses 0. Measured on one op (ORT 1.32, 2 threads, a Xeon with AVX512-VNNI and AMX, 5 interleaved
rounds): level 4 ran 2.7-3.7x faster than a float MatMul for one row (a decode step) at K, N in 384..5632, and
0.4-0.84x for 128 rows (a full sequence), where level 0 ran 0.84-0.97x: the int8 path pays for single-token
decode, not for the full-sequence graph this exporter writes; a decoder graph with a cache should take 4
where the CPU has int8 dot products (``cpu_int8_dot``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from modelpress.errors import ModelpressError
from modelpress.quantize.weight_only_pack import _EXPORTING, WeightOnlyLinear, matmul_nbits  # noqa: F401

# weight-only export vs the torch model it lowers: float compute on the same dequantized weights (level 0/1);
# level 4 rounds the activations to int8 per block on top
MIN_COSINE = 0.99
LEVELS = (0, 1, 2, 3, 4)


@contextlib.contextmanager
def exporting() -> Any:
    token = _EXPORTING.set(True)
    try:
        yield
    finally:
        _EXPORTING.reset(token)


def fold_bias(m: onnx.ModelProto) -> int:
    """Move ``MatMulNBits -> Add(bias initializer [N])`` into MatMulNBits' bias input (input 5). A bias the
    tracer routed through ``Identity`` (equal initializers, e.g. zero biases, are stored once) counts too;
    Identity nodes left without users are removed."""
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    for n in g.node:  # Identity(initializer): the same tensor under another name
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in inits:
            inits[n.output[0]] = inits[n.input[0]]
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    drop, count = set(), 0
    for n in g.node:
        if n.op_type != "MatMulNBits" or len(n.input) > 4 or n.output[0] in outputs:
            continue
        users = consumers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        other = add.input[1] if add.input[0] == n.output[0] else add.input[0]
        t = inits.get(other)
        big_n = next(a.i for a in n.attribute if a.name == "N")
        if t is None or t.data_type != onnx.TensorProto.FLOAT or list(t.dims) != [big_n]:
            continue
        while len(n.input) < 5:
            n.input.append("")
        n.input.append(t.name)
        n.output[0] = add.output[0]
        drop.add(id(add))
        count += 1
    used = {i for n in g.node if id(n) not in drop for i in n.input} | outputs
    keep = [n for n in g.node if id(n) not in drop and not (n.op_type == "Identity" and n.output[0] not in used)]
    del g.node[:]
    g.node.extend(keep)
    return count


def pack_siblings(m: onnx.ModelProto) -> int:
    """Pack the MatMulNBits nodes that read one input (a block's q/k/v projections, an MLP's gate/up) into one
    MatMulNBits over the rows of all of them, then a Split: the same codes, scales, zero points and biases
    concatenated along N, so the result is exact, and one kernel reads the activation once (a decode step
    launches 12 fewer kernels on a 6-block Llama). Siblings pack when their K, bits, block size, accuracy level
    and optional inputs agree and every packed input is an initializer; returns the number of groups packed."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = m.graph
    inits = {t.name: t for t in g.initializer}
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.input[0] in inits}

    def init(name: str) -> onnx.TensorProto | None:
        return inits.get(alias.get(name, name))

    def attrs(n: onnx.NodeProto) -> dict[str, int]:
        return {a.name: a.i for a in n.attribute}

    groups: dict[tuple, list[onnx.NodeProto]] = {}
    for n in g.node:
        if n.op_type != "MatMulNBits" or n.domain != "com.microsoft":
            continue
        a = attrs(n)
        optional = tuple(bool(i) for i in list(n.input[3:]) + [""] * (6 - len(n.input)))
        if any(optional[i] for i in (1,)):  # g_idx (act-order index): not packed
            continue
        if not all(init(i) is not None for i in n.input[1:] if i):
            continue
        key = (n.input[0], a.get("K"), a.get("bits", 4), a.get("block_size"), a.get("accuracy_level", 0), optional)
        groups.setdefault(key, []).append(n)
    packed = 0
    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        first = nodes[0]
        sizes = [attrs(n)["N"] for n in nodes]
        name = first.name + "_packed" if first.name else f"MatMulNBits_packed_{packed}"
        inputs = [first.input[0]]
        for slot in range(1, len(first.input)):
            if not first.input[slot]:
                inputs.append("")
                continue
            arrays = [numpy_helper.to_array(init(n.input[slot])) for n in nodes]
            tensor = numpy_helper.from_array(np.concatenate(arrays, axis=0), f"{name}.input{slot}")
            g.initializer.append(tensor)
            inputs.append(tensor.name)
        a = {k: v for k, v in attrs(first).items() if k != "N"}
        node = helper.make_node("MatMulNBits", inputs, [f"{name}_output"], name=name, domain="com.microsoft",
                                N=sum(sizes), **a)
        split_sizes = numpy_helper.from_array(np.array(sizes, dtype=np.int64), f"{name}.split")
        g.initializer.append(split_sizes)
        split = helper.make_node("Split", [node.output[0], split_sizes.name], [n.output[0] for n in nodes],
                                 name=f"{name}_split", axis=-1)
        replace[id(first)] = [node, split]
        drop.update(id(n) for n in nodes[1:])
        packed += 1
    if packed:
        nodes = []
        for n in g.node:
            if id(n) in replace:
                nodes.extend(replace[id(n)])
            elif id(n) not in drop:
                nodes.append(n)
        del g.node[:]
        g.node.extend(nodes)
        from modelpress.export.graph_edits import drop_unused_initializers, keep_nodes

        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep_nodes(g, lambda n: not (n.op_type == "Identity" and n.output[0] not in used))
        drop_unused_initializers(g)
    return packed


def set_accuracy_level(m: onnx.ModelProto, level: int) -> None:
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = int(level)


def export_weight_only_onnx(model: torch.nn.Module, example: Any, path: Path, input_names: list[str],
                            dynamic_axes: dict | None = None, accuracy_level: int = 0) -> Path:
    """Write ``model`` (with packed weight-only layers) as ONNX with MatMulNBits at ``path``."""
    from modelpress.quantize.qdq import export_qdq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.onnx")
    with exporting():
        export_qdq(model, example, tmp, input_names=input_names, dynamic_axes=dynamic_axes, ort_fusion=False,
                   custom_opsets={"com.microsoft": 1})
    m = onnx.load(str(tmp))
    tmp.unlink(missing_ok=True)
    clean_traced(m, accuracy_level)
    onnx.save(m, str(tmp))
    tmp.replace(path)
    return path


def clean_traced(m: onnx.ModelProto, accuracy_level: int = 0, pack: bool = False) -> onnx.ModelProto:
    """The traced model's fix-ups: the tracer's value_info guesses around the contrib op dropped (ONNX Runtime
    infers its own), biases folded into MatMulNBits, with ``pack`` siblings reading one input packed into one
    MatMulNBits (the cached decoder's lowering: measured there), one accuracy level on every MatMulNBits."""
    del m.graph.value_info[:]
    fold_bias(m)
    if pack:
        pack_siblings(m)
    set_accuracy_level(m, accuracy_level)
    return m


def decoder_lowering(accuracy_level: int | str = "auto") -> Any:
    """The packed layers' lowering for the cached decoder (``export.decoder.DecoderLowering``): MatMulNBits
    traced at level 0 (float compute on the dequantized weights: verified strictly against the torch model),
    then, as the fast form, level 4 (int8 activations) where ``accuracy_level`` is "auto" and the CPU has int8
    dot products (decode runs one row per step, where level 4 measured 2.7-3.7x a float MatMul), or the
    level given."""
    from modelpress.export.decoder import DecoderLowering

    if accuracy_level != "auto" and accuracy_level not in LEVELS:
        raise ModelpressError(f"accuracy_level {accuracy_level!r} is not a MatMulNBits level",
                              "use auto, 0, 1, 2, 3 or 4")
    if accuracy_level == "auto":
        fast_level = 4 if cpu_int8_dot() else None
    else:
        fast_level = int(accuracy_level) or None

    def fast(m: onnx.ModelProto) -> str | None:
        if fast_level is None or not any(n.op_type == "MatMulNBits" for n in m.graph.node):
            return None
        set_accuracy_level(m, fast_level)
        return f"MatMulNBits accuracy_level {fast_level}"

    def postprocess(m: onnx.ModelProto) -> onnx.ModelProto:
        return clean_traced(m, 0, pack=True)

    return DecoderLowering(name="weight-only MatMulNBits", context=exporting, custom_opsets={"com.microsoft": 1},
                           postprocess=postprocess, fast=fast)


@dataclass
class WeightOnlyExport:
    path: Path
    optimization: str
    verification: dict
    kernels: dict
    integer_kernels: int
    export_seconds: float
    candidates: dict  # {"accuracy_level": how it was chosen: the checks, the timings, the choice}


def cpu_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX; Arm dot product)."""
    from modelpress.system import system_info

    info = system_info()
    return bool(info["vnni"] or info["amx"] or "asimddp" in info["cpu_flags"] or "i8mm" in info["cpu_flags"])


def export_weight_only(graph: Any, path: Path, ctx: Any, accuracy_level: int | str = "auto") -> WeightOnlyExport:
    """The ``quantize.weight_only`` pass's exporter: MatMulNBits ONNX at ``path``, verified against the torch
    model; ``accuracy_level`` an int or "auto" (module docstring)."""
    from modelpress.quantize.qdq import export_examples, integer_kernel_count, ort_kernels, verify_qdq

    t0 = time.perf_counter()
    path = Path(path)
    example, batches = export_examples(graph)
    names = list(graph.input_spec.names)
    axes = graph.input_spec.dynamic_axes()
    reporter = getattr(ctx, "reporter", None)
    step = reporter.step if reporter is not None else (lambda _: contextlib.nullcontext())
    if accuracy_level != "auto" and accuracy_level not in LEVELS:
        raise ModelpressError(f"accuracy_level {accuracy_level!r} is not a MatMulNBits level",
                              "use auto, 0, 1, 2, 3 or 4")
    with step("exporting the weight-only model (MatMulNBits)"):
        export_weight_only_onnx(graph.module, example, path, names, axes, 0)
    base = onnx.load(str(path))
    decision: dict[str, Any] = {"requested": accuracy_level, "cpu_int8_dot": cpu_int8_dot()}
    checks: dict[int, dict] = {}
    candidates = [0, 4] if accuracy_level == "auto" else [int(accuracy_level)]
    files: dict[int, Path] = {}
    for level in candidates:
        p = path if level == candidates[0] else path.with_name(f"{path.stem}.level{level}.onnx")
        set_accuracy_level(base, level)
        onnx.save(base, str(p))
        files[level] = p
        checks[level] = verify_qdq(p, graph.module, batches)
    good = [lv for lv in candidates if checks[lv]["min_cosine"] >= MIN_COSINE]
    if not good:
        raise ModelpressError(
            f"the MatMulNBits export disagrees with the torch weight-only model (cosine "
            f"{max(c['min_cosine'] for c in checks.values()):.4f})", "report this with the recipe")
    chosen = good[0]
    if len(good) > 1:
        measure = getattr(ctx, "measure", None)
        if getattr(ctx, "target", None) is not None and callable(measure):
            with step("timing MatMulNBits accuracy levels 0 (float) and 4 (int8) on the target"):
                # batch 1 alone, speed alone: the choice reads the batch-1 speedup (a 1B model's batch-8 rows and
                # memory probes cost minutes and decide nothing)
                rep = measure({f"level{lv}": files[lv] for lv in good}, baseline=f"level{good[0]}", batch_sizes=[1],
                              memory=False)
            speed = {lv: rep.speedup(f"level{lv}", 1) for lv in good}
            decision["speedup_vs_level0_batch1"] = speed
            chosen = max(good, key=lambda lv: speed.get(lv) or 0.0)
            decision["how"] = "measured on the target"
        else:
            chosen = 0 if 0 in good else good[0]
            decision["how"] = "no target to time on: float compute (level 4 pays for one-row decode only)"
    decision["chosen"] = chosen
    decision["checks"] = {lv: {k: checks[lv][k] for k in ("min_cosine", "max_abs_error")} for lv in candidates}
    if files[chosen] != path:
        files[chosen].replace(path)
    for p in files.values():
        if p != path:
            p.unlink(missing_ok=True)
    kernels = ort_kernels(path, workdir=path.parent)
    return WeightOnlyExport(path, f"matmulnbits (accuracy_level {chosen})", checks[chosen], dict(kernels), integer_kernel_count(kernels)
                            + kernels.get("MatMulNBits", 0), time.perf_counter() - t0, {"accuracy_level": decision})
