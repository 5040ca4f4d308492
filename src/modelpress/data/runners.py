"""Runners: one callable shape (numpy batch in, primary output out) for torch modules and ONNX files."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpress.errors import ModelpressError
from modelpress.graph.inputs import primary_output
from modelpress.targets import cpu_session

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]

__all__ = ["OnnxRunner", "Runner", "TorchRunner", "call_module", "onnx_runner", "torch_runner"]

_PRIMARY_OUTPUT_NAMES = ("logits", "last_hidden_state")
_ORT_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def call_module(module: torch.nn.Module, names: list[str], inputs: dict[str, torch.Tensor]) -> Any:
    """Call ``module`` with ``inputs``: by keyword, or positionally when it has one input whose forward
    argument has another name (``forward(self, x)`` fed ``pixel_values``)."""
    if len(names) == 1 and not _accepts_kwarg(module, names[0]):
        return module(inputs[names[0]])
    return module(**{n: inputs[n] for n in names if n in inputs})


class TorchRunner:
    """Runs a torch module in eval mode without gradients; returns its primary output as float32 numpy.

    The module's training flag is restored after each call, so a runner may wrap a model being trained.
    """

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        self.module = module
        self.names = list(names)
        self._positional = len(self.names) == 1 and not _accepts_kwarg(module, self.names[0])

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        param = next(self.module.parameters(), None)
        tensors = {n: _to_tensor(batch[n], param) for n in self.names if n in batch}
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                if self._positional:
                    out = self.module(tensors[self.names[0]])
                else:
                    out = self.module(**tensors)
        finally:
            self.module.train(was_training)
        return primary_output(out).detach().float().cpu().numpy()


class OnnxRunner:
    """Runs an ONNX file in ONNX Runtime on the CPU; feeds only the inputs the session declares, cast to the
    declared element types (ints to int64 for the usual text inputs)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelpressError(f"ONNX file {str(self.path)!r} not found", "export the model first")
        self.session = cpu_session(self.path, threads)
        self.inputs = [(i.name, _ORT_NUMPY.get(i.type, np.float32)) for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = next((n for n in _PRIMARY_OUTPUT_NAMES if n in outputs), outputs[0])

    @property
    def input_names(self) -> list[str]:
        return [name for name, _ in self.inputs]

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {}
        for name, dtype in self.inputs:
            if name not in batch:
                raise ModelpressError(
                    f"{self.path.name} takes input {name!r}, which the data lacks (it has {sorted(batch)})",
                    "give data with the model's inputs",
                )
            feed[name] = np.ascontiguousarray(np.asarray(batch[name]), dtype=dtype)
        out = self.session.run([self.output], feed)[0]
        return np.asarray(out, dtype=np.float32)


def torch_runner(module: torch.nn.Module, names: list[str]) -> Runner:
    """A :data:`Runner` for a torch module taking the inputs ``names`` (see :class:`TorchRunner`)."""
    return TorchRunner(module, names)


def onnx_runner(path: str | Path, threads: int | None = None) -> Runner:
    """A :data:`Runner` for an ONNX file on ONNX Runtime's CPU provider (see :class:`OnnxRunner`)."""
    return OnnxRunner(path, threads)


def _accepts_kwarg(module: torch.nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _to_tensor(value: Any, like: torch.Tensor | None) -> torch.Tensor:
    """Ints become int64; floats take the module's floating dtype; both go to the module's device."""
    tensor = torch.as_tensor(np.asarray(value))
    if tensor.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        tensor = tensor.to(torch.int64)
    if like is None:
        return tensor
    if tensor.is_floating_point() and like.is_floating_point():
        tensor = tensor.to(like.dtype)
    return tensor.to(like.device)
