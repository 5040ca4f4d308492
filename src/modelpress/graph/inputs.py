"""What a model takes as input: names, kinds and dynamic axes, and how to make sample inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from modelpress.graph.family import FALLBACK_VOCAB_SIZE, start_token_id

# The primary output and the export wrapper live with the torch runner (graph.run); re-exported here.
from modelpress.graph.run import PrimaryOutput, primary_output

__all__ = ["InputSpec", "PrimaryOutput", "primary_output"]


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
    max_seq_len: int | None = None  # the longest sequence the model takes (position table), None: unknown

    def fit_seq_len(self, seq_len: int) -> int:
        """``seq_len`` capped at what the model takes (a target's 128 on a model with 64 positions)."""
        return seq_len if self.max_seq_len is None else min(seq_len, self.max_seq_len)

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
            "max_seq_len": self.max_seq_len,
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
            max_seq_len=d.get("max_seq_len"),
        )

