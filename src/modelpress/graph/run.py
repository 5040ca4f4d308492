"""Running a torch module on a batch: the one calling convention, primary output and autograd-free call.

Every layer that runs a torch model (data runners and tasks, export and its verification, the latency
runner, calibration) calls it through ``call_module`` so that a model whose forward takes one input
under another name (``forward(self, x)`` fed ``pixel_values``) runs the same way everywhere.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "PrimaryOutput",
    "TorchCall",
    "accepts_kwarg",
    "as_tensors",
    "call_module",
    "eval_mode",
    "primary_output",
    "run_primary",
]

Inputs = Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor


def primary_output(outputs: Any) -> torch.Tensor:
    """The one tensor a task evaluates: logits if present, else last_hidden_state, else the first tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    for key in ("logits", "last_hidden_state"):
        value = getattr(outputs, key, None)
        if value is None and isinstance(outputs, dict):
            value = outputs.get(key)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    if isinstance(outputs, dict):
        for v in outputs.values():
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"cannot find an output tensor in {type(outputs).__name__}")


def accepts_kwarg(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes ``name`` as a keyword argument (or any keyword, via ``**kwargs``)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _positional(module: nn.Module, names: Sequence[str]) -> bool:
    return len(names) == 1 and not accepts_kwarg(module, names[0])


def call_module(module: nn.Module, inputs: Inputs, names: Sequence[str] | None = None) -> Any:
    """Call ``module`` on ``inputs`` and return whatever it returns (autograd and mode untouched).

    A tensor or a tuple/list is passed positionally. A dict is passed by keyword (only ``names``, in
    that order, when given), or positionally when it holds one input whose forward argument has another
    name (``forward(self, x)`` fed ``pixel_values``).
    """
    if isinstance(inputs, torch.Tensor):
        return module(inputs)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    names = list(inputs) if names is None else list(names)
    if _positional(module, names):
        return module(inputs[names[0]])
    return module(**{n: inputs[n] for n in names if n in inputs})


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; the module's own training flag is restored after (even on error)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class PrimaryOutput(nn.Module):
    """Wraps a model so that it takes its inputs positionally and returns only its primary output (for export)."""

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.module = module
        self.names = list(names)
        self._positional = _positional(module, self.names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self._positional:
            return primary_output(self.module(*args))
        return primary_output(self.module(**dict(zip(self.names, args, strict=True))))


class TorchCall:
    """Runs a module on named inputs without autograd and returns its detached primary output.

    ``inference``: ``torch.inference_mode`` (fastest; its tensors can never enter autograd later) instead
    of ``torch.no_grad``. The module's train/eval mode is left as it is: callers that time many calls set
    eval mode once around them (``eval_mode``); ``run_primary`` sets it per call.
    """

    def __init__(self, module: nn.Module, names: Sequence[str], *, inference: bool = False) -> None:
        self.module = module
        self.names = list(names)
        self.inference = inference
        self._positional = _positional(module, self.names)

    def __call__(self, inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """``inputs``: tensors keyed by name (names the batch lacks are left out) or in ``names`` order."""
        if isinstance(inputs, (tuple, list)):
            inputs = dict(zip(self.names, inputs, strict=True))
        with torch.inference_mode() if self.inference else torch.no_grad():
            if self._positional:
                out = self.module(inputs[self.names[0]])
            else:
                out = self.module(**{n: inputs[n] for n in self.names if n in inputs})
            return primary_output(out).detach()


def run_primary(
    module: nn.Module, inputs: Inputs, names: Sequence[str] | None = None, *, inference: bool = False
) -> torch.Tensor:
    """One call of ``module`` (see ``call_module``) in eval mode without autograd, the module's mode
    restored after: its detached primary output. ``inference`` as in :class:`TorchCall`."""
    with eval_mode(module), torch.inference_mode() if inference else torch.no_grad():
        return primary_output(call_module(module, inputs, names)).detach()


def as_tensors(
    batch: Mapping[str, Any], names: Sequence[str], like: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The inputs ``names`` present in ``batch`` as tensors: ints become int64; floats take ``like``'s
    floating dtype; all go to ``like``'s device (``like``: a parameter of the module, None keeps them)."""
    out = {}
    for name in names:
        if name not in batch:
            continue
        value = batch[name]
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if tensor.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
            tensor = tensor.to(torch.int64)
        if like is not None:
            if tensor.is_floating_point() and like.is_floating_point():
                tensor = tensor.to(like.dtype)
            tensor = tensor.to(like.device)
        out[name] = tensor
    return out

