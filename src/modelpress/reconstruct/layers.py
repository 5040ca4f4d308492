"""The layer kinds reconstruction refits, seen as one matrix ``[out, columns]`` times one input row.

* ``nn.Linear``: the weight as it is; rows are the input's last axis.
* transformers' ``Conv1D`` (GPT-2's ``[in, out]`` linear, ``graph.family.is_transposed_linear``): the weight
  transposed.
* ``nn.Conv2d`` (ungrouped, zero padding): im2col. Rows are the unfolded patches (``F.unfold``, channel-major:
  channel c owns columns ``c*kh*kw .. (c+1)*kh*kw - 1``) and the matrix is the weight flattened to
  ``[out, in*kh*kw]``, so removing input channel c removes its kh*kw columns. Grouped and depthwise
  convolutions are skipped (their input channels belong to output groups; removing one is not a column edit).

Anything else is skipped with a reason (:func:`skip_reason`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from modelpress.graph.family import is_transposed_linear

__all__ = ["bias_of", "can_add_bias", "columns", "input_axis", "matrix", "output_axis", "rows", "set_matrix", "skip_reason"]


def skip_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be refit as ``[out, columns]`` (None when it can)."""
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}): its input channels are not plain columns"
        if module.padding_mode != "zeros":
            return f"padding mode {module.padding_mode!r}: im2col here pads with zeros"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding {module.padding!r}: give numeric padding"
        return None
    return f"{type(module).__name__} is not a Linear, Conv1D or Conv2d"


def input_axis(module: nn.Module) -> int:
    """The weight axis that indexes input channels (0 for Conv1D's ``[in, out]``, else 1)."""
    return 0 if is_transposed_linear(module) else 1


def output_axis(module: nn.Module) -> int:
    """The weight axis that indexes output units (1 for Conv1D, else 0)."""
    return 1 - input_axis(module)


def _kernel_area(module: nn.Module) -> int:
    return int(np.prod(module.kernel_size)) if isinstance(module, nn.Conv2d) else 1


def columns(module: nn.Module, channels: np.ndarray) -> np.ndarray:
    """Matrix columns of input ``channels`` (a convolution's channel c: its kh*kw patch columns)."""
    area = _kernel_area(module)
    channels = np.asarray(channels, dtype=np.int64)
    return (channels[:, None] * area + np.arange(area)[None, :]).reshape(-1)


def matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, columns]`` (a view or transpose of the parameter, detached)."""
    w = module.weight.detach()
    if is_transposed_linear(module):
        return w.t()
    return w.reshape(w.shape[0], -1)


def can_add_bias(module: nn.Module) -> bool:
    """Whether a bias-less layer can be given one (``graph.edit.add_bias``: Linear and convolutions)."""
    return isinstance(module, (nn.Linear, nn.Conv2d)) and getattr(module, "bias", None) is None


def bias_of(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return b.detach() if isinstance(b, torch.Tensor) else None


@torch.no_grad()
def set_matrix(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Put a refit ``[out, columns]`` matrix (and bias, when given) into the layer: the same parameters (tied
    names and optimizers keep them) over new storage, never written into, so a pruned copy that shares its
    untouched tensors with the original (``ModelGraph.copy(share_weights=True)``) leaves the original as it was."""
    w = module.weight
    new = weight.t() if is_transposed_linear(module) else weight.reshape(w.shape)
    w.data = new.to(w.dtype).clone(memory_format=torch.contiguous_format)
    if bias is not None:
        module.bias.data = bias.to(module.bias.dtype).clone(memory_format=torch.contiguous_format).reshape(module.bias.shape)


def rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input ``x`` as rows ``[r, columns]`` that its matrix multiplies."""
    if isinstance(module, nn.Conv2d):
        padding = 0 if module.padding == "valid" else module.padding
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])
