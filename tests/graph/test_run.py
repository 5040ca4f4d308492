"""The one torch runner: calling convention, eval mode restored, no_grad vs inference_mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.graph.run import PrimaryOutput, TorchCall, call_module, run_primary


class _X(nn.Module):
    """forward(x): one input under another name than the data's (``pixel_values``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.9)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.drop(self.lin(x))}


class _Two(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return a if b is None else a - b


def test_call_module_conventions() -> None:
    x, y = torch.ones(2, 4), torch.full((2, 4), 3.0)
    one = _X().eval()
    assert torch.equal(call_module(one, {"pixel_values": x})["logits"], one(x)["logits"])  # positional
    two = _Two()
    assert torch.equal(call_module(two, {"b": y, "a": x}), x - y)  # by keyword, any order
    assert torch.equal(call_module(two, {"a": x, "b": y}, ["a"]), x)  # only the names asked for
    assert torch.equal(call_module(two, (x, y)), x - y)  # a tuple positionally
    assert torch.equal(PrimaryOutput(two, ["b", "a"])(y, x), x - y)  # export wrapper: names give the order


def test_run_primary_eval_mode_restored_and_autograd_free() -> None:
    torch.manual_seed(0)
    m = _X().train()
    x = {"pixel_values": torch.randn(3, 4)}
    out = run_primary(m, x)
    assert m.training  # restored
    assert torch.equal(out, run_primary(m, x))  # eval mode: dropout off, deterministic
    assert not out.requires_grad and not out.is_inference()
    out.requires_grad_()  # a no_grad result may enter autograd later (distillation targets)
    fast = run_primary(m, x, inference=True)
    assert fast.is_inference() and torch.equal(fast, out.detach())


def test_run_primary_restores_mode_when_the_model_fails() -> None:
    m = _Two().train()
    with pytest.raises(TypeError):
        run_primary(m, {"a": torch.ones(1), "c": torch.ones(1)})  # no argument "c"
    assert m.training


def test_torch_call_keeps_the_mode_and_skips_missing_names() -> None:
    m = _Two().train()
    call = TorchCall(m, ["a", "b"], inference=True)
    x = torch.ones(2)
    assert torch.equal(call({"a": x}), x)  # "b" absent from the batch: left out
    assert torch.equal(call((x, x)), torch.zeros(2))
    assert m.training  # TorchCall leaves mode to the caller (the latency runner sets eval once)
