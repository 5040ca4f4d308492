"""TensorRT engines from modelpress QDQ ONNX files (explicit quantization, the ``tensorrt`` extra).

TensorRT builds an explicit-precision engine when the network carries Q/DQ layers; with a strongly
typed network the Q/DQ placement alone decides the precisions (no INT8 builder flag, no calibrator).
Its Q/DQ rules differ from ONNX Runtime's CPU kernels: activations must be *signed* INT8 with zero
point 0 (quantize with ``symmetric_activations: true``) and the graph must be standard ONNX (export with
``ort_fusion=False``: no com.microsoft fused ops). ``tensorrt_problems`` checks a file for both without
a GPU; ``build_engine`` and ``run_engine`` need TensorRT and a CUDA device.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from modelpress.errors import ModelpressError

INSTALL_HINT = "pip install 'modelpress[tensorrt]' on a machine with an NVIDIA GPU and CUDA"


def tensorrt_available() -> bool:
    """TensorRT imports and a CUDA device is visible (through torch)."""
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def tensorrt_problems(path: Path | str) -> list[str]:
    """Why TensorRT's explicit quantization would reject or misread this QDQ file (empty: none found)."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    problems = []
    custom = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        problems.append(f"non-standard ops {custom}: export with ort_fusion=False")
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zero = inits.get(node.input[2])
        if zero is None:
            continue
        if zero.data_type == onnx.TensorProto.UINT8:
            problems.append(f"{node.name or node.output[0]}: uint8 zero point (TensorRT quantizes to int8)")
            break
        if np.any(numpy_helper.to_array(zero) != 0):
            problems.append(
                f"{node.name or node.output[0]}: non-zero zero point (quantize with symmetric_activations)"
            )
            break
    return problems


def _shapes(
    network: Any, shapes: Mapping[str, Sequence[Sequence[int]]] | None
) -> dict[str, tuple[tuple[int, ...], ...]]:
    out = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = tuple(t.shape)
        if shapes and t.name in shapes:
            lo, opt, hi = (tuple(int(d) for d in s) for s in shapes[t.name])
        elif all(d > 0 for d in dims):
            lo = opt = hi = dims
        else:
            raise ModelpressError(
                f"input {t.name!r} has dynamic dimensions {dims}",
                "give shapes={name: (min, opt, max)} for every dynamic input",
            )
        out[t.name] = (lo, opt, hi)
    return out


def build_engine(
    onnx_path: Path | str,
    engine_path: Path | str,
    shapes: Mapping[str, Sequence[Sequence[int]]] | None = None,
    workspace_gib: float = 4.0,
) -> Path:
    """Build a TensorRT engine from a QDQ (or float) ONNX file, strongly typed; written atomically.

    ``shapes``: {input name: (min, opt, max) shape} for dynamic inputs (one optimization profile).
    """
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ModelpressError("building a TensorRT engine needs the tensorrt package", INSTALL_HINT) from e
    problems = tensorrt_problems(onnx_path)
    if problems:
        raise ModelpressError(f"{onnx_path} is not a TensorRT-ready QDQ file: {problems[0]}",
                              "quantize with symmetric_activations: true and export with ort_fusion=False")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelpressError(f"TensorRT cannot parse {onnx_path}: {errors}", "check the ONNX opset and ops")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in _shapes(network, shapes).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelpressError(f"TensorRT failed to build an engine from {onnx_path}", "see TensorRT's log above")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=engine_path.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(plan))
        os.replace(tmp, engine_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return engine_path


def run_engine(engine_path: Path | str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a TensorRT engine once on ``feeds`` (numpy arrays); returns every output as numpy.

    Device buffers are torch CUDA tensors (no pycuda needed)."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
              trt.int32: torch.int32, trt.int8: torch.int8, trt.bool: torch.bool}
    keep: list[torch.Tensor] = []
    outputs: dict[str, torch.Tensor] = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            t = torch.as_tensor(np.ascontiguousarray(feeds[name])).to(dtypes[engine.get_tensor_dtype(name)])
            t = t.cuda()
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=dtypes[engine.get_tensor_dtype(name)], device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return {k: v.float().cpu().numpy() for k, v in outputs.items()}
