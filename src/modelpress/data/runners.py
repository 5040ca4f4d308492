"""Runners: one callable shape (numpy batch in, primary output out) for torch modules and ONNX files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from modelpress.errors import ModelpressError
from modelpress.graph.run import TorchCall, as_tensors, eval_mode
from modelpress.targets import cpu_session

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]

__all__ = ["OnnxRunner", "Runner", "TorchRunner", "onnx_runner", "torch_runner"]

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


class TorchRunner:
    """Runs a torch module in eval mode without gradients; returns its primary output as float32 numpy.

    A thin :data:`Runner` over ``modelpress.graph.run``: inputs become tensors of the module's dtype and
    device (ints int64), the call convention is the one every runner shares, and the module's training
    flag is restored after each call, so a runner may wrap a model being trained.
    """

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        self.module = module
        self.names = list(names)
        self._call = TorchCall(module, self.names)

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        tensors = as_tensors(batch, self.names, next(self.module.parameters(), None))
        with eval_mode(self.module):
            out = self._call(tensors)
        return out.float().cpu().numpy()


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

