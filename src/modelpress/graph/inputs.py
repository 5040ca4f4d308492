"""What a model takes as input: names, kinds and dynamic axes, and how to make sample inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from modelpress.graph.adapters import FALLBACK_VOCAB_SIZE, start_token_id


@dataclass
class InputSpec:
    """Describes a model's forward inputs.

    kind: "text" (input_ids, attention_mask, token_type_ids...), "image" ([B, C, H, W] floats)
    or "tensor" (one float tensor of ``shape``, first axis batch). For text, ``vocab_size`` and
    ``special_ids`` (cls, bos, sep, eos, pad: ``adapters.input_defaults`` fills them from the model's
    tokenizer or config) shape the sample inputs; a hand-made spec gets BERT's.
    """

    kind: str
    names: list[str]
    shape: tuple[int, ...] = ()  # per-sample shape for image/tensor inputs (C, H, W)
    vocab_size: int = FALLBACK_VOCAB_SIZE
    default_seq_len: int = 128
    dtypes: dict[str, str] = field(default_factory=dict)
    special_ids: dict[str, int] = field(default_factory=dict)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        if self.kind == "text":
            return {n: {0: "batch", 1: "sequence"} for n in self.names}
        return {n: {0: "batch"} for n in self.names}

    def make(self, batch: int = 1, seq_len: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic sample inputs as numpy arrays (for ONNX Runtime and benchmarks)."""
        rng = np.random.default_rng(seed)
        if self.kind == "text":
            seq = seq_len or self.default_seq_len
            out: dict[str, np.ndarray] = {}
            for n in self.names:
                if n == "input_ids":
                    low = min(1000, self.vocab_size // 4)
                    ids = rng.integers(low, max(low + 1, self.vocab_size - 1), size=(batch, seq), dtype=np.int64)
                    ids[:, 0] = start_token_id(self.special_ids, self.vocab_size)
                    out[n] = ids
                elif n == "attention_mask":
                    out[n] = np.ones((batch, seq), dtype=np.int64)
                else:
                    out[n] = np.zeros((batch, seq), dtype=np.int64)
            return out
        return {self.names[0]: rng.random((batch, *self.shape), dtype=np.float32)}

    def make_torch(self, batch: int = 1, seq_len: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.make(batch, seq_len, seed).items()}

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "names": list(self.names),
            "shape": list(self.shape),
            "vocab_size": self.vocab_size,
            "default_seq_len": self.default_seq_len,
            "special_ids": dict(self.special_ids),
        }

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(
            kind=d["kind"],
            names=list(d["names"]),
            shape=tuple(d.get("shape", ())),
            vocab_size=int(d.get("vocab_size", FALLBACK_VOCAB_SIZE)),
            default_seq_len=int(d.get("default_seq_len", 128)),
            special_ids={str(k): int(v) for k, v in d.get("special_ids", {}).items()},
        )


def primary_output(outputs) -> torch.Tensor:  # noqa: ANN001 - any model output
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


class PrimaryOutput(torch.nn.Module):
    """Wraps a model so that it takes its inputs positionally and returns only its primary output (for export)."""

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.module = module
        self.names = list(names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.names, args, strict=True))
        if len(self.names) == 1 and not _accepts_kwarg(self.module, self.names[0]):
            return primary_output(self.module(*args))
        return primary_output(self.module(**kwargs))


def _accepts_kwarg(module: torch.nn.Module, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
