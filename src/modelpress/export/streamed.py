"""torch.onnx export that writes the weights straight from the live tensors to an external-data file.

``torch.onnx.export`` (the TorchScript exporter) holds about three more copies of the weights while it
exports (its parameter dictionary, the folded transposes, the serialized protobuf): BERT-base, 438 MB of
weights, peaked 3.2x its weights above the model itself, with or without constant folding (measured, torch
2.13). Exported with ``export_params=False`` instead, the graph alone costs about 0.6x (the trace); the
weights then go to ``<file>.data`` one tensor at a time, and a ``Transpose`` the tracer put on a 2-D weight
(``nn.Linear`` as MatMul) is written transposed, as torch's constant folding would have done, so the graph
is the one the folded export gives. Peak: one tensor's transposed copy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.graph.mapped import drop_tensors, dropped_after_use, file_mappings_frozen

# models whose weights pass this are streamed by ``export_onnx`` and the QDQ export (smaller ones stay one
# self-contained file): BERT-base pruned to 0.6 of its parameters (264 MB) is streamed, MiniLM (91 MB) is not
STREAM_MIN_BYTES = 128 * 2**20
_ALIGN = 64  # bytes between tensors in the data file


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (tied tensors once)."""
    seen: dict[int, torch.Tensor] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


def _onnx_type(t: torch.Tensor) -> int:
    from onnx import TensorProto

    types = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
             torch.float64: TensorProto.DOUBLE, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
             torch.int16: TensorProto.INT16, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
             torch.bool: TensorProto.BOOL}
    if t.dtype not in types:
        raise ModelpressError(f"cannot stream a {t.dtype} tensor into ONNX", "export with stream=False")
    return types[t.dtype]


def _raw(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _is_swap(node: Any) -> bool:
    """A Transpose of a 2-D tensor (no perm, or perm [1, 0])."""
    perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
    return not perm or perm[0] == [1, 0]


_SHAPE_PASS = "_jit_pass_onnx_graph_shape_type_inference"


@contextlib.contextmanager
def _without_whole_graph_shape_inference(skip: bool) -> Iterator[None]:
    """While inside (``skip``), torch's whole-graph ONNX shape inference (``torch._C._jit_pass_onnx_graph_shape_type_inference``,
    called from two places in torch's exporter with every parameter) does nothing. It copies every parameter it is
    given, so after the trace all the weights were resident at once (mapped ones read back from their files) with
    a copy beside them: BERT-base's float twin export peaked at 1.0-1.2 GiB against 0.6 GiB without it (torch 2.13).
    torch treats the pass as optional (its failure never stops an export); the per-node inference during the
    conversion still runs. Tests compare the graphs with and without it (MiniLM, float and QDQ)."""
    original = getattr(torch._C, _SHAPE_PASS, None)
    if not skip or original is None:
        yield
        return
    setattr(torch._C, _SHAPE_PASS, lambda *_args, **_kwargs: None)
    try:
        yield
    finally:
        setattr(torch._C, _SHAPE_PASS, original)


def export_streamed(module: nn.Module, args: tuple, path: Path | str, *, input_names: list[str],
                    fold_transposes: bool = True, constants_min_elems: int = 0, graph_shape_inference: bool = True,
                    **kwargs: Any) -> None:
    """``torch.onnx.export(module, args, path, input_names=..., **kwargs)`` with the weights written from the live
    tensors into ``<path>.data`` (external data), never held as a second copy. ``kwargs`` go to the exporter
    (``export_params`` and ``do_constant_folding`` are set here). ``fold_transposes``: write a transposed 2-D
    weight as its own initializer, as constant folding would (False: keep the Transpose nodes, as the decoder
    export does, so that a tied embedding and LM head stay one tensor). ``constants_min_elems``: Constant nodes of
    at least that many elements (a QDQ export's int8 weight codes) go to the data file too, as initializers named
    by the node's output (0: Constants stay in the graph). ``graph_shape_inference=False``: skip torch's
    whole-graph shape inference, which copies every weight (see :func:`_without_whole_graph_shape_inference`)."""
    import onnx

    path = Path(path)
    skeleton = path.with_name(path.stem + ".skeleton.onnx")
    # torch's constant folding would fold the weights too (into nameless inputs): the transposes are folded below
    kwargs["do_constant_folding"] = False
    # weights mapped from a file (a checkpoint's, a pipeline's spilled ones) leave the resident set once read, by
    # the trace and by the writer below, so they are not all resident under the exporter
    with dropped_after_use(module), _without_whole_graph_shape_inference(not graph_shape_inference):
        torch.onnx.export(module, args, str(skeleton), input_names=input_names, export_params=False, **kwargs)
    model = onnx.load(str(skeleton))
    skeleton.unlink()
    tensors: dict[str, torch.Tensor] = dict(module.named_buffers(remove_duplicate=False))
    tensors.update(module.named_parameters(remove_duplicate=False))
    graph = model.graph
    weights = [i for i in graph.input if i.name not in set(input_names)]
    unknown = [i.name for i in weights if i.name not in tensors]
    if unknown:
        raise ModelpressError(f"the exported graph reads inputs that are not the model's tensors: {unknown[:5]}",
                              "export with stream=False")
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    data_name = path.name + ".data"
    folded: list[Any] = []
    initializers: list[Any] = []
    offset = 0
    with open(path.parent / data_name, "wb") as f, file_mappings_frozen():  # the mappings read once, not per tensor

        def write(name: str, t: torch.Tensor) -> None:
            nonlocal offset
            tp = onnx.TensorProto(name=name, data_type=_onnx_type(t), dims=list(t.shape))
            raw = _raw(t)
            pad = -offset % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            tp.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(raw.nbytes))):
                tp.external_data.add(key=key, value=value)
            offset += raw.nbytes
            initializers.append(tp)
            drop_tensors([t])  # written: its mapped pages (if any) may go

        for value in weights:
            t = tensors[value.name]
            nodes = readers.get(value.name, [])
            swaps = [n for n in nodes if fold_transposes and n.op_type == "Transpose" and t.dim() == 2 and _is_swap(n)]
            for node in swaps:  # what constant folding does: the transposed weight as an initializer
                write(node.output[0], t.detach().t())
                folded.append(node)
            if len(swaps) < len(nodes) or not nodes:
                write(value.name, t)
        if constants_min_elems:
            from onnx import numpy_helper

            for node in list(graph.node):
                if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
                    continue
                value = node.attribute[0].t
                if math.prod(value.dims) >= constants_min_elems:
                    write(node.output[0], torch.from_numpy(numpy_helper.to_array(value).copy()))
                    folded.append(node)
    for node in folded:
        graph.node.remove(node)
    kept = [i for i in graph.input if i.name in set(input_names)]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(initializers)
    onnx.save(model, str(path))

